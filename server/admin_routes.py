"""Patch and tenant management routes (admin key), running in the API process.

They write the registry and nothing else: workers see every change through the registry
generation before their next batch, whoever made it (this server, the CLI, another replica).
An upload is validated, checked to be a kind this server can serve and verified against the
served model's signature before a byte is stored.

Every route authenticates before it reads a body (bodies are read in the handlers, after the
`admin` dependency), and every body is bounded. An upload is streamed to an unnamed
temporary file and checked from there in bounded memory, so a gigabyte upload costs the API
process a few megabytes; `max_concurrent_uploads` bound how many are spooled at once
(429 with Retry-After beyond that).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, BinaryIO

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from patches.errors import ConceptGuardError, TenantNotFound
from patches.patch import Patch
from patches.registry import Registry
from patches.registry_records import check_stack, check_tenant_name
from server.auth import Caller, KeyRing
from server.config import ServerConfig
from server.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    RouteNotFound,
    TenantConfigured,
    TooManyUploads,
    error_payload,
    payload_for,
    response_headers,
)
from server.openai_routes import not_found_message
from server.request_body import body_chunks, parse_body, read_json, spool_body
from server.runtime import check_servable, check_servable_kind

logger = logging.getLogger(__name__)


class TenantStackBody(BaseModel):
    """`PUT /v1/tenants/{tenant}`: the ordered stack (first applied first)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    patches: list[str] = Field(
        max_length=64, description="Patch refs (id, id prefix, NAME@VERSION or NAME)"
    )


class RollbackBody(BaseModel):
    """`POST /v1/tenants/{tenant}/rollback` (optional): the history entry to return to."""

    model_config = ConfigDict(extra="forbid", strict=True)

    to_generation: int | None = Field(
        default=None, description="Default: the latest earlier stack that differs"
    )


def install_error_handlers(app: FastAPI) -> None:
    """The one mapping from ConceptGuard errors (and malformed bodies, unknown routes, wrong
    methods) to HTTP answers; any other exception is a logged 500 with the same JSON shape,
    never a plain-text page or a bare `{"detail": "Not Found"}`."""

    async def conceptguard_error(request: Request, exc: ConceptGuardError) -> JSONResponse:
        status, body = payload_for(exc)
        return JSONResponse(body, status_code=status, headers=response_headers(exc))

    async def routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            error: ConceptGuardError = RouteNotFound(not_found_message(method, path))
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = MethodNotAllowed(f"{method} is not allowed on {path} (allowed: {allowed})")
        else:
            body = error_payload("HTTPError", str(exc.detail))
            return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
        status, body = payload_for(error)
        return JSONResponse(body, status_code=status, headers=exc.headers)

    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(error_payload("InvalidRequest", message), status_code=400)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        status, body = payload_for(InternalError("the server failed; see its log"))
        return JSONResponse(body, status_code=status)

    app.add_exception_handler(ConceptGuardError, conceptguard_error)
    app.add_exception_handler(StarletteHTTPException, routing_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(Exception, unexpected)


class UploadSlots:
    """At most `limit` uploads spooled and checked at once in this API process. The event
    loop is one thread, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.busy >= self.limit:
            raise TooManyUploads(
                f"{self.busy} patch uploads are being received or checked, the most this "
                f"server takes at once; retry in {TooManyUploads.retry_after_s} s"
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


# The uploaded file, and the name given in a multipart form (if any).
SpooledUpload = tuple[BinaryIO, str | None]


@asynccontextmanager
async def _spooled_upload(request: Request, limit: int) -> AsyncIterator[SpooledUpload]:
    """The patch file from a raw body or a multipart form (field `file`, optional `name`),
    on disk; the temporary file has no name, so nothing is left behind, even by a crash."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        with tempfile.TemporaryFile() as file:
            await spool_body(request, limit, "patch upload", file)
            yield file, None
        return
    parser = MultiPartParser(
        Headers(raw=request.headers.raw),
        body_chunks(request, limit, "patch upload"),
        max_files=1,
        max_fields=4,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from None
    try:
        upload, name = form.get("file"), form.get("name")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("a multipart upload needs the patch file in a field named 'file'")
        yield upload.file, name if isinstance(name, str) else None
    finally:
        await form.close()


def register_admin_routes(
    app: FastAPI, registry: Registry, keys: KeyRing, model: Any, config: ServerConfig
) -> None:
    """Add the admin API to `app` (before the server starts)."""
    slots = UploadSlots(config.max_concurrent_uploads)

    def admin(request: Request) -> Caller:
        return keys.admin(request.headers)

    def check_upload(patch: Patch) -> None:
        check_servable(patch, model, "the uploaded patch")

    def servable_ids(tenant: str, refs: list[str]) -> list[str]:
        # Resolved once, so the kinds checked are those of the very patches assigned.
        ids = [registry.resolve(ref) for ref in refs]
        check_stack(tenant, ids, refs)  # refused here, so the message names the refs given
        for ref, pid in zip(refs, ids, strict=True):
            record = registry.patch_record(pid)
            check_servable_kind(record.kind, f"patch {ref!r} ({record.ref})")
        return ids

    def may_create(tenant: str, create: bool) -> bool:
        """Whether assigning `tenant` may create its record: a configured tenant, or one the
        caller asked to create (its key is not configured yet). A typo is a 404."""
        if tenant in keys.tenants or create:
            return True
        if tenant not in registry.snapshot().tenants:
            configured = ", ".join(sorted(keys.tenants)) or "none"
            raise TenantNotFound(
                f"tenant {tenant!r} is not configured on this server (configured: "
                f"{configured}) and has no record; to give a stack to a tenant whose key is "
                "not configured yet, ask for it explicitly (?create=true, `conceptguard tenant "
                "set --create`)"
            )
        return False

    @app.post("/v1/patches", status_code=201, dependencies=[Depends(admin)])
    async def upload_patch(request: Request, name: str | None = None) -> JSONResponse:
        with slots.slot():
            async with _spooled_upload(request, config.max_patch_bytes) as (file, form_name):
                registered = await run_in_threadpool(
                    registry.put_patch_file, file, name or form_name, check_upload
                )
        status = 201 if registered.created else 200
        return JSONResponse(registered.record.to_dict(), status_code=status)

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
    async def set_tenant(tenant: str, request: Request, create: bool = False) -> dict[str, Any]:
        body = parse_body(TenantStackBody, await read_json(request))
        check_tenant_name(tenant)

        def assign() -> dict[str, Any]:
            creatable = may_create(tenant, create)
            ids = servable_ids(tenant, body.patches)
            return registry.set_tenant(tenant, ids, create=creatable).to_dict()

        return await run_in_threadpool(assign)

    @app.get("/v1/tenants/{tenant}", dependencies=[Depends(admin)])
    def get_tenant(tenant: str) -> dict[str, Any]:
        return registry.get_tenant(tenant).to_dict()

    @app.delete("/v1/tenants/{tenant}", dependencies=[Depends(admin)])
    def delete_tenant(tenant: str) -> dict[str, Any]:
        if tenant in keys.tenants:
            raise TenantConfigured(
                f"tenant {tenant!r} is configured on this server: deleting its record would "
                "serve it the unpatched model. Give it an empty stack (PUT with "
                '{"patches": []}) to mean that, or remove it from the config first'
            )
        record = registry.get_tenant(tenant)
        registry.delete_tenant(tenant)
        return {"deleted": record.to_dict()}

    @app.post("/v1/tenants/{tenant}/rollback", dependencies=[Depends(admin)])
    async def rollback_tenant(tenant: str, request: Request) -> dict[str, Any]:
        body = parse_body(RollbackBody, await read_json(request) or {})
        record = await run_in_threadpool(registry.rollback_tenant, tenant, body.to_generation)
        return record.to_dict()
