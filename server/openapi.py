"""The OpenAPI document of the running server (`GET /openapi.json`, rendered at `/docs`).

Written here, route by route, rather than inferred: most routes read their bodies by hand
(after authentication, bounded), return records that are not response models, and answer
errors from one mapping (server/errors.py), none of which FastAPI can see. Each operation
lists every status it can answer with the error types behind it, its request and response
schemas and media types, and the key it needs (`bearer` security). The generation request's
bounds are this server's configured limits. tests/test_openapi.py checks that every route is
documented and runs schemathesis against the live server with every kind of key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from patches import __version__
from patches.registry_records import _TENANT_NAME, PatchRecord, TenantRecord
from server.admin_routes import RollbackBody, TenantStackBody
from server.config import ServerConfig
from server.openai_routes import ModelCard, ModelList
from server.schemas import ImageGenerationRequest, ImagesResponse


class PatchList(BaseModel):
    generation: int
    patches: list[PatchRecord]


class TenantList(BaseModel):
    generation: int
    tenants: list[TenantRecord]


class DeletedPatch(BaseModel):
    deleted: PatchRecord


class DeletedTenant(BaseModel):
    deleted: TenantRecord


class ErrorDetail(BaseModel):
    type: str  # the error's class in ConceptGuard's hierarchy (docs/API.md)
    code: str  # the type in snake case
    message: str


class Error(BaseModel):
    """Every error answer: FastAPI's `detail` and OpenAI's `error` object."""

    detail: str
    error: ErrorDetail


_SCHEMAS: list[tuple[type[BaseModel], str]] = [
    (ImageGenerationRequest, "validation"),
    (TenantStackBody, "validation"),
    (RollbackBody, "validation"),
    (ImagesResponse, "serialization"),
    (ModelList, "serialization"),
    (ModelCard, "serialization"),
    (PatchList, "serialization"),
    (TenantList, "serialization"),
    (DeletedPatch, "serialization"),
    (DeletedTenant, "serialization"),
    (Error, "serialization"),
]

# Statuses that always carry Retry-After (seconds).
_RETRY_AFTER = {429, 504}
_REGISTRY_500 = "InternalError, RegistryCorrupt (a stored file changed on disk)"
_REGISTRY_503 = "RegistryStateMissing, RegistryUnreadable (nothing is written)"
_JSON_BODY = {
    408: "RequestTimeout (headers, or a body not whole within http.body_timeout_s)",
    413: "PayloadTooLarge (a JSON body over 1 MiB)",
}


@dataclass(frozen=True)
class Operation:
    summary: str
    ok: dict[int, tuple[str, Any]]  # status -> (description, schema name or media type)
    errors: dict[int, str]  # status -> the error types it carries
    keys: str | None = None  # who may call it; None: no key
    body: dict[str, Any] | None = None
    params: tuple[dict[str, Any], ...] = ()


def _param(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


def _json_body(schema: str, required: bool = True) -> dict[str, Any]:
    return {
        "required": required,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_REF = _param("ref", "path", {"type": "string"}, "patch id, id prefix (8+ hex), NAME@VERSION, NAME")
_TENANT = _param(
    "tenant", "path", {"type": "string", "pattern": f"^{_TENANT_NAME.pattern}$"}, "tenant name"
)
_UPLOAD = {
    "required": True,
    "description": "The patch file (a safetensors file with a ConceptGuard manifest)",
    "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "name": {"type": "string", "description": "patch name"},
                },
            }
        },
    },
}


def _operations(model_id: str) -> dict[tuple[str, str], Operation]:
    admin = "the admin key"
    read = {400: "InvalidRequest (two Authorization headers)"}
    return {
        ("get", "/"): Operation("What this server is", {200: ("a line of text", "text/plain")}, {}),
        ("get", "/health"): Operation(
            "Readiness: 200 'ok' once every worker is ready and some worker can serve",
            {200: ("ok", "text/plain"), 503: ("not ready", "text/plain")},
            {},
        ),
        ("get", "/metrics"): Operation(
            "Prometheus metrics, merged over every process",
            {200: ("Prometheus text format", "text/plain")},
            read,
            keys="a metrics key or the admin key",
        ),
        ("post", "/v1/images/generations"): Operation(
            "Generate images (OpenAI images API; the tenant is the key's)",
            {200: ("the images and what produced them", "ImagesResponse")},
            {
                400: "InvalidRequest (malformed or unknown fields, a bound: size, work, n, "
                "steps, prompt; a `tenant` field; two Authorization headers)",
                **_JSON_BODY,
                429: "QueueFull, TenantQueueFull (admission control; nothing was queued)",
                500: "GenerationFailed, InternalError",
                503: "StackNotReady, RegistryUnavailable (fail closed: never the unpatched "
                "model instead), WorkerLost, ShuttingDown (these two with Retry-After)",
                504: "QueueTimeout (no worker started it within batching.queue_timeout_s)",
            },
            keys="a tenant key",
            body=_json_body("ImageGenerationRequest"),
        ),
        ("get", "/v1/models"): Operation(
            "The served model (OpenAI models API)",
            {200: ("one model", "ModelList")},
            read,
            keys="a tenant key or the admin key",
        ),
        ("get", "/v1/models/{model}"): Operation(
            "One model: the served one",
            {200: ("the model", "ModelCard")},
            {**read, 404: f"ModelNotFound (this server serves {model_id!r} only)"},
            keys="a tenant key or the admin key",
            params=(_param("model", "path", {"type": "string"}, "model id"),),
        ),
        ("post", "/v1/patches"): Operation(
            "Upload a patch: validated, checked to be servable and verified against the "
            "served model before it is stored",
            {
                200: ("registered already under this name: the existing record", "PatchRecord"),
                201: ("registered", "PatchRecord"),
            },
            {
                400: "a patch-file refusal (TruncatedFile, PickleRefused, HeaderNotJSON, "
                "ContentHashMismatch, NonFiniteValues, ...; docs/PATCH_FORMAT.md), "
                "InvalidName, InvalidRequest (no `file` field, a malformed form)",
                408: "RequestTimeout (the body stalled)",
                409: "PatchExists (these bytes are registered under another name)",
                413: "PayloadTooLarge (over max_patch_bytes), FileTooLarge",
                422: "BaseFingerprintMismatch, WrongTarget, UnknownTensorName, ShapeMismatch, "
                "UnsupportedPatchKind (valid, but not for this server's model)",
                429: "TooManyUploads (max_concurrent_uploads in progress)",
                500: _REGISTRY_500,
                503: _REGISTRY_503,
            },
            keys=admin,
            body=_UPLOAD,
            params=(_param("name", "query", {"type": "string"}, "patch name"),),
        ),
        ("get", "/v1/patches"): Operation(
            "Every registered patch",
            {200: ("the records", "PatchList")},
            {**read, 500: _REGISTRY_500, 503: _REGISTRY_503},
            keys=admin,
        ),
        ("get", "/v1/patches/{ref}"): Operation(
            "One patch record",
            {200: ("the record", "PatchRecord")},
            {
                400: "AmbiguousReference, InvalidRequest",
                404: "PatchNotFound",
                500: _REGISTRY_500,
                503: _REGISTRY_503,
            },
            keys=admin,
            params=(_REF,),
        ),
        ("delete", "/v1/patches/{ref}"): Operation(
            "Delete a patch no tenant uses",
            {200: ("the deleted record", "DeletedPatch")},
            {
                400: "AmbiguousReference, InvalidRequest",
                404: "PatchNotFound",
                409: "PatchInUse",
                500: _REGISTRY_500,
                503: _REGISTRY_503,
            },
            keys=admin,
            params=(_REF,),
        ),
        ("get", "/v1/tenants"): Operation(
            "Every tenant record",
            {200: ("the records", "TenantList")},
            {**read, 500: _REGISTRY_500, 503: _REGISTRY_503},
            keys=admin,
        ),
        ("get", "/v1/tenants/{tenant}"): Operation(
            "A tenant's stack and history",
            {200: ("the record", "TenantRecord")},
            {
                400: "InvalidName, InvalidRequest",
                404: "TenantNotFound",
                500: _REGISTRY_500,
                503: _REGISTRY_503,
            },
            keys=admin,
            params=(_TENANT,),
        ),
        ("put", "/v1/tenants/{tenant}"): Operation(
            "Set a tenant's ordered patch stack (first applied first; [] = the base model)",
            {200: ("the record", "TenantRecord")},
            {
                400: "InvalidRequest, InvalidName (also a patch listed twice), AmbiguousReference",
                404: "TenantNotFound (not configured and no record, without ?create=true), "
                "PatchNotFound",
                **_JSON_BODY,
                422: "UnsupportedPatchKind",
                500: _REGISTRY_500,
                503: _REGISTRY_503,
            },
            keys=admin,
            body=_json_body("TenantStackBody"),
            params=(
                _TENANT,
                _param(
                    "create",
                    "query",
                    {"type": "boolean", "default": False},
                    "create the record of a tenant whose key is not configured yet",
                ),
            ),
        ),
        ("delete", "/v1/tenants/{tenant}"): Operation(
            "Delete the record of a tenant the config does not name",
            {200: ("the deleted record", "DeletedTenant")},
            {
                400: "InvalidName, InvalidRequest",
                404: "TenantNotFound",
                409: "TenantConfigured",
                500: _REGISTRY_500,
                503: _REGISTRY_503,
            },
            keys=admin,
            params=(_TENANT,),
        ),
        ("post", "/v1/tenants/{tenant}/rollback"): Operation(
            "Return a tenant to an earlier stack (a new history entry)",
            {200: ("the record", "TenantRecord")},
            {
                400: "InvalidRequest, InvalidName",
                404: "TenantNotFound, PatchNotFound (that stack used a deleted patch)",
                **_JSON_BODY,
                409: "NothingToRollBack",
                500: _REGISTRY_500,
                503: _REGISTRY_503,
            },
            keys=admin,
            body=_json_body("RollbackBody", required=False),
            params=(_TENANT,),
        ),
    }


def _content(target: str) -> dict[str, Any]:
    if "/" in target:  # a media type
        return {target: {"schema": {"type": "string"}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{target}"}}}


def _responses(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(status): {"description": description, "content": _content(target)}
        for status, (description, target) in op.ok.items()
    }
    errors = dict(op.errors)
    if op.keys is not None:
        errors.setdefault(400, "InvalidRequest (two Authorization headers)")
        errors[401] = "Unauthorized (no key, not 'Bearer <key>', an unknown key)"
        errors[403] = f"Forbidden (a key of another role: this needs {op.keys})"
    errors.setdefault(408, "RequestTimeout (headers not complete within http.header_timeout_s)")
    errors.setdefault(500, "InternalError (logged in full, never shown)")
    for status in sorted(errors):
        answer: dict[str, Any] = {"description": errors[status], "content": _content("Error")}
        if status in _RETRY_AFTER or (status == 503 and "Retry-After" in errors[status]):
            answer["headers"] = {
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "required": status in _RETRY_AFTER,
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        responses[str(status)] = answer
    return responses


def _operation(method: str, path: str, op: Operation) -> dict[str, Any]:
    document: dict[str, Any] = {
        "operationId": f"{method}_{re.sub('[^a-z0-9]+', '_', path).strip('_') or 'index'}",
        "summary": op.summary,
        "responses": _responses(op),
    }
    if op.keys is not None:
        document["security"] = [{"bearer": []}]
        document["description"] = f"Needs {op.keys}."
    if op.params:
        document["parameters"] = list(op.params)
    if op.body is not None:
        document["requestBody"] = op.body
    return document


def _request_bounds(schema: dict[str, Any], config: ServerConfig, native: int) -> None:
    """The configured limits, in the generation request's schema."""
    limits, props = config.limits, schema["properties"]
    props["prompt"].update(minLength=1, maxLength=limits.max_prompt_chars)
    props["n"]["anyOf"][0].update(minimum=1, maximum=limits.max_images)
    props["steps"]["anyOf"][0].update(minimum=1, maximum=limits.max_steps)
    props["negative_prompt"]["anyOf"][0].update(maxLength=limits.max_prompt_chars)
    max_side = limits.max_side_for(native)
    props["size"]["anyOf"][0]["pattern"] = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
    props["size"]["description"] += (
        f": {limits.min_side} to {max_side} here; this model draws {native}x{native}. A request "
        f"may ask for at most {limits.max_image_steps} image-steps (n x steps x "
        "width x height / native side^2)"
    )


def document(config: ServerConfig, native: int, model_id: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a server with `config` serving `model_id`."""
    _, definitions = models_json_schema(_SCHEMAS, ref_template="#/components/schemas/{model}")
    schemas = definitions["$defs"]
    _request_bounds(schemas["ImageGenerationRequest"], config, native)
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in _operations(model_id).items():
        paths.setdefault(path, {})[method] = _operation(method, path, op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ConceptGuard",
            "version": __version__,
            "description": "Text-to-image generation with per-tenant safety patches. Every "
            "error answers `{detail, error: {type, code, message}}`; docs/API.md has the "
            f"details. Served model: {model_id}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: a tenant key (generation), the admin key "
                    "(patches and tenants) or a metrics key (/metrics)",
                }
            },
        },
    }


def install_openapi(app: FastAPI, config: ServerConfig, native: int, model_id: str) -> None:
    """Serve this document at /openapi.json (and so at /docs)."""
    built = document(config, native, model_id)
    app.title = "ConceptGuard"
    app.openapi = lambda: built
