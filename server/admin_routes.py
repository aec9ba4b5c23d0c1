"""Patch and tenant management routes (admin key), running in the API process.

They write the registry and nothing else: workers see every change through the registry
generation before their next batch, whoever made it (this server, the CLI, another replica).
An upload is validated (`Patch.from_bytes`), checked to be a kind this server can serve and
verified against the served model's components before a byte is stored.

The served model's components come from the main process, which loads the pipeline once at
start-up (to fail early) and computes its fingerprints before LitServe forks the API process;
the fork shares those pages copy-on-write, so verifying an upload never reloads the model.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from patches.errors import ConceptGuardError
from patches.patch import Patch
from patches.registry import Registry
from patches.registry_records import check_stack
from server.auth import Caller, KeyRing
from server.errors import InvalidRequest, error_payload, payload_for
from server.request_body import read_body
from server.runtime import check_servable_kind


class TenantStackBody(BaseModel):
    """`PUT /v1/tenants/{tenant}`: the ordered stack (first applied first)."""

    model_config = ConfigDict(extra="forbid")

    patches: list[str] = Field(max_length=64)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_generation: int | None = None


def install_error_handlers(app: FastAPI) -> None:
    """The one mapping from ConceptGuard errors (and malformed bodies) to HTTP answers."""

    async def conceptguard_error(request: Request, exc: ConceptGuardError) -> JSONResponse:
        status, body = payload_for(exc)
        return JSONResponse(body, status_code=status)

    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(error_payload("InvalidRequest", message), status_code=400)

    app.add_exception_handler(ConceptGuardError, conceptguard_error)
    app.add_exception_handler(RequestValidationError, invalid_body)


async def _upload_bytes(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The patch file from a raw body or a multipart form (field `file`, optional `name`)."""
    body = await read_body(request, limit, "patch upload")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return body, None

    async def chunks():
        yield body

    try:
        form = await MultiPartParser(Headers(raw=request.headers.raw), chunks()).parse()
    except Exception as exc:  # the parser's own error types differ between versions
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InvalidRequest("a multipart upload needs the patch file in a field named 'file'")
    name = form.get("name")
    return await upload.read(), name if isinstance(name, str) else None


def register_admin_routes(
    app: FastAPI, registry: Registry, keys: KeyRing, model: Any, max_patch_bytes: int
) -> None:
    """Add the admin API to `app` (before the server starts)."""

    def admin(request: Request) -> Caller:
        return keys.admin(request.headers.get("authorization"))

    def check_upload(patch: Patch) -> None:
        check_servable_kind(patch.manifest.kind, "the uploaded patch")
        patch.verify(model)

    def servable_ids(tenant: str, refs: list[str]) -> list[str]:
        # Resolved once, so the kinds checked are those of the very patches assigned.
        ids = [registry.resolve(ref) for ref in refs]
        check_stack(tenant, ids, refs)  # refused here, so the message names the refs given
        for ref, pid in zip(refs, ids, strict=True):
            record = registry.patch_record(pid)
            check_servable_kind(record.kind, f"patch {ref!r} ({record.ref})")
        return ids

    @app.post("/v1/patches", status_code=201, dependencies=[Depends(admin)])
    async def upload_patch(request: Request, name: str | None = None) -> dict[str, Any]:
        data, form_name = await _upload_bytes(request, max_patch_bytes)
        record = await run_in_threadpool(registry.put_patch, data, name or form_name, check_upload)
        return record.to_dict()

    @app.get("/v1/patches", dependencies=[Depends(admin)])
    def list_patches() -> dict[str, Any]:
        state = registry.snapshot()
        records = sorted(state.patches.values(), key=lambda r: (r.name, r.version))
        return {"generation": state.generation, "patches": [r.to_dict() for r in records]}

    @app.get("/v1/patches/{ref}", dependencies=[Depends(admin)])
    def get_patch(ref: str) -> dict[str, Any]:
        return registry.patch_record(ref).to_dict()

    @app.delete("/v1/patches/{ref}", dependencies=[Depends(admin)])
    def delete_patch(ref: str) -> dict[str, Any]:
        return {"deleted": registry.delete_patch(ref).to_dict()}

    @app.get("/v1/tenants", dependencies=[Depends(admin)])
    def list_tenants() -> dict[str, Any]:
        state = registry.snapshot()
        tenants = [state.tenants[name].to_dict() for name in sorted(state.tenants)]
        return {"generation": state.generation, "tenants": tenants}

    @app.put("/v1/tenants/{tenant}", dependencies=[Depends(admin)])
    def set_tenant(tenant: str, body: TenantStackBody) -> dict[str, Any]:
        return registry.set_tenant(tenant, servable_ids(tenant, body.patches)).to_dict()

    @app.get("/v1/tenants/{tenant}", dependencies=[Depends(admin)])
    def get_tenant(tenant: str) -> dict[str, Any]:
        return registry.get_tenant(tenant).to_dict()

    @app.post("/v1/tenants/{tenant}/rollback", dependencies=[Depends(admin)])
    def rollback_tenant(tenant: str, body: RollbackBody | None = None) -> dict[str, Any]:
        to_generation = body.to_generation if body else None
        return registry.rollback_tenant(tenant, to_generation).to_dict()
