"""The server's errors, in the one ConceptGuard hierarchy, and their single mapping to HTTP.

Every refusal the server makes is a `ConceptGuardError` whose class carries `http_status`
(patches/errors.py); `error_payload` turns any of them into the JSON body every endpoint
returns, so no code path classifies errors by message.
"""

from __future__ import annotations

import re
from typing import Any

from patches.errors import ConceptGuardError, ModelLoadError, PatchIncompatible


class InvalidRequest(ConceptGuardError):
    """A request body that is not valid JSON, or breaks a documented bound."""

    http_status = 400


class Unauthorized(ConceptGuardError):
    """No API key, or one this server does not know."""

    http_status = 401


class Forbidden(ConceptGuardError):
    """A known key used where its role may not go (a tenant key on an admin route)."""

    http_status = 403


class RouteNotFound(ConceptGuardError):
    """No route answers this path (an OpenAI endpoint this server does not serve, a typo)."""

    http_status = 404


class MethodNotAllowed(ConceptGuardError):
    """The path exists, but not for this HTTP method."""

    http_status = 405


class PayloadTooLarge(ConceptGuardError):
    http_status = 413


class TooManyUploads(ConceptGuardError):
    """Every upload slot is busy: uploads are spooled to disk and checked one by one, and a
    few at a time bound the disk and CPU they take. Retry later."""

    http_status = 429
    retry_after_s = 5


class RequestTimeout(ConceptGuardError):
    """A request's headers or body did not arrive in time (a stalled or very slow client)."""

    http_status = 408


class QueueFull(ConceptGuardError):
    """The server holds as many generation requests as it may (admission control): the
    request was not accepted, nothing was queued. Retry later."""

    http_status = 429
    retry_after_s = 2


class TenantQueueFull(QueueFull):
    """This tenant holds its whole share of the server's queue; other tenants keep theirs."""


class QueueTimeout(ConceptGuardError):
    """No worker started the request within the queue timeout; it is never computed."""

    http_status = 504
    retry_after_s = 5


class WorkerLost(ConceptGuardError):
    """The worker computing the request died or stopped making progress; the request was
    not answered by it and will not be. Retry: another (or a replacement) worker serves it."""

    http_status = 503
    retry_after_s = 5
    refusal = "worker_lost"


class ShuttingDown(ConceptGuardError):
    """The server is stopping; the request was not (or not completely) served."""

    http_status = 503
    retry_after_s = 5
    refusal = "shutting_down"


class ClientDisconnected(ConceptGuardError):
    """The client closed the connection before its answer (nginx's 499): its work is
    dropped or stopped, and nobody is answered."""

    http_status = 499


class RequestCancelled(ConceptGuardError):
    """Nobody waits for this request any more (the API process answered it, or its client
    left): the worker did not compute it, or stopped. Nobody receives this answer."""

    http_status = 499


class TenantConfigured(ConceptGuardError):
    """A tenant the server's config names cannot be deleted from the registry through it
    (it would be served the base model); clear its stack, or remove it from the config."""

    http_status = 409


class InternalError(ConceptGuardError):
    """An error nobody expected; the server logs it in full, the client sees only this."""

    http_status = 500


class UnsupportedPatchKind(PatchIncompatible):
    """A valid patch of a kind this server cannot serve yet (U-Net patches: issue 6)."""


class UnsupportedPipeline(ModelLoadError):
    """A pipeline family the multi-tenant runtime cannot serve yet."""


class StackNotReady(ConceptGuardError):
    """The tenant's patch stack could not be loaded or verified: fail closed, never serve
    that tenant from the unpatched model."""

    http_status = 503


class RegistryUnavailable(ConceptGuardError):
    """The worker cannot read the registry, so it cannot know any tenant's stack."""

    http_status = 503


class GenerationFailed(ConceptGuardError):
    """The pipeline raised while generating; the message is logged in full by the worker."""

    http_status = 500


# Bounded label values for the refusals metric (never a message or a tenant's input).
REFUSAL_REASONS: dict[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "incompatible",
    408: "timeout",
    429: "busy",
    499: "client_closed",
    503: "fail_closed",
    504: "timeout",
}


def refusal_reason(status: int, error: ConceptGuardError | None = None) -> str:
    """The refusals metric's label: the error's own `refusal` where it has one (a 503 that
    is not fail-closed), else by status."""
    own = getattr(error, "refusal", None)
    if own is not None:
        return own
    return REFUSAL_REASONS.get(status, "server_error" if status >= 500 else "other")


def error_code(error_type: str) -> str:
    """OpenAI's `error.code` for one of our error types: the type in snake case
    (`TenantQueueFull` -> `tenant_queue_full`), stable for clients to branch on."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", error_type).lower()


def error_payload(error_type: str, message: str) -> dict[str, Any]:
    """The body of every error response: FastAPI's `detail` plus OpenAI's `error` object
    (`type`, `code`, `message`), so both plain HTTP clients and the `openai` client show the
    reason and can branch on it."""
    error = {"type": error_type, "code": error_code(error_type), "message": message}
    return {"detail": message, "error": error}


def payload_for(exc: ConceptGuardError) -> tuple[int, dict[str, Any]]:
    return exc.http_status, error_payload(type(exc).__name__, str(exc))


def response_headers(exc: ConceptGuardError) -> dict[str, str]:
    """Headers an error's answer carries (Retry-After where waiting helps)."""
    return {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
