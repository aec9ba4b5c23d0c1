"""Reading request bodies: bounded in size, nesting and time, streamed, and only after the
caller is authenticated (routes call these from their handlers, after their auth dependency: a
body parameter would make FastAPI read and parse the body before any dependency runs).

A body that stalls - no byte for the body timeout - is answered 408, and a JSON body must
also be whole within it, so a client that sends part of a body cannot hold the server's
resources. The timeout is the server's `http.body_timeout_s`, kept on the app's state
(`app.state.body_timeout_s`, set by server/app.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, BinaryIO, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from patches.untrusted_json import TooDeeplyNested, loads_untrusted
from server.errors import InvalidRequest, PayloadTooLarge, RequestTimeout

# Every JSON body the server accepts is far smaller; uploads have their own bound.
MAX_JSON_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
# Spooled uploads are written in pieces this large, off the event loop.
_SPOOL_WRITE_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0

Model = TypeVar("Model", bound=BaseModel)


def body_timeout(request: Request) -> float:
    app = request.scope.get("app")
    state = getattr(app, "state", None)
    return getattr(state, "body_timeout_s", DEFAULT_BODY_TIMEOUT_S)


async def body_chunks(
    request: Request, limit: int, what: str, whole_within: float | None = None
) -> AsyncIterator[bytes]:
    """The body as it arrives, refused with 413 as soon as it is known to exceed `limit`
    bytes: from Content-Length before a byte is read, else while counting. 408 when no byte
    comes for the body timeout, or the whole body not within `whole_within` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the {what} is {declared} bytes; the limit is {limit} bytes")
    stall = body_timeout(request)
    loop = asyncio.get_running_loop()
    deadline = None if whole_within is None else loop.time() + whole_within
    stream = request.stream()
    size = 0
    try:
        while True:
            wait = stall if deadline is None else min(stall, deadline - loop.time())
            try:
                chunk = await asyncio.wait_for(anext(stream), max(0.0, wait))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise RequestTimeout(
                        f"the {what} did not arrive within {whole_within:g} s"
                    ) from None
                raise RequestTimeout(
                    f"the {what} stalled: no byte arrived for {stall:g} s"
                ) from None
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the {what} exceeds the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect:
        raise InvalidRequest(f"the client disconnected before sending the whole {what}") from None
    finally:
        await stream.aclose()


async def read_body(
    request: Request, limit: int, what: str = "request body", whole_within: float | None = None
) -> bytes:
    chunks = body_chunks(request, limit, what, whole_within)
    return b"".join([chunk async for chunk in chunks])


async def spool_body(request: Request, limit: int, what: str, file: BinaryIO) -> int:
    """Write the body into `file` (memory stays flat however large it is); its size."""
    pending, size = bytearray(), 0
    async for chunk in body_chunks(request, limit, what):
        pending += chunk
        size += len(chunk)
        if len(pending) >= _SPOOL_WRITE_BYTES:
            await run_in_threadpool(file.write, pending)
            pending.clear()
    await run_in_threadpool(file.write, pending)
    return size


async def read_json(request: Request, limit: int = MAX_JSON_BODY_BYTES) -> Any:
    """The body as JSON; None for an empty body."""
    body = await read_body(request, limit, "JSON body", whole_within=body_timeout(request))
    if not body.strip():
        return None
    try:
        return loads_untrusted(body, MAX_JSON_DEPTH)
    except TooDeeplyNested as exc:
        raise InvalidRequest(f"body: {exc}") from None
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError among them
        raise InvalidRequest("body: not valid JSON") from None


def parse_body(model: type[Model], body: Any) -> Model:
    """`body` validated as `model`, or InvalidRequest naming every field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message = "; ".join(
            f"{'.'.join(['body', *(str(p) for p in e['loc'])])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(message) from None
