"""`POST /v1/images/generations` in the API process: authenticate, validate, enqueue, answer.

A LitServe spec (the same extension point as LitServe's OpenAI specs) owns the route, so the
API process - the only one that sees headers - resolves the tenant from the key and puts a
`WorkItem` carrying it on the worker queue. A client cannot name a tenant: the public request
model has no such field, and a body that tries is refused (400).

Workers answer every row with `{"status": code, "body": json}` instead of raising, because
LitServe's batched loop fails a whole batch on one exception; this endpoint turns a row's
answer into its HTTP response, so one tenant's failure never fails its batch neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from patches.errors import ConceptGuardError
from server.auth import KeyRing
from server.config import ServerConfig
from server.errors import InternalError, error_payload, payload_for
from server.request_body import read_json
from server.schemas import WorkItem, parse_request

if TYPE_CHECKING:
    from server.metrics import Metrics

GENERATIONS_PATH = "/v1/images/generations"
MAX_REQUEST_BYTES = 1 << 20

logger = logging.getLogger(__name__)


class ImagesSpec(LitSpec):
    """The OpenAI-images-shaped route, with tenants."""

    def __init__(self, config: ServerConfig):
        super().__init__()
        self.api_path = GENERATIONS_PATH
        self.config = config
        self._keys: KeyRing | None = None
        self._metrics: Metrics | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The spec travels to the workers with the LitAPI; metrics objects stay behind.
        return {**super().__getstate__(), "_metrics": None}

    def pre_setup(self, lit_api: Any) -> None:
        self.add_endpoint(self.api_path, self.generate, ["POST"])

    # The LitAPI decodes and encodes; these satisfy LitSpec's interface only.
    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    @property
    def keys(self) -> KeyRing:
        if self._keys is None:
            self._keys = KeyRing(self.config)
        return self._keys

    @property
    def metrics(self) -> Metrics:
        if self._metrics is None:
            from server.metrics import Metrics

            self._metrics = Metrics(self.config.tenants)
        return self._metrics

    async def generate(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        tenant = None
        try:
            tenant = self.keys.tenant(request.headers).tenant
            parsed = parse_request(await read_json(request, MAX_REQUEST_BYTES), self.config.limits)
            seed = parsed.seed if parsed.seed is not None else secrets.randbelow(2**32)
            item = WorkItem(uuid.uuid4().hex, tenant, parsed, seed, time.time())
            status, body = await self._submit(item)
        except ConceptGuardError as exc:
            status, body = payload_for(exc)
        except Exception:
            # Still a JSON answer, and still counted: never a plain-text 500.
            logger.exception("generation request failed")
            status, body = payload_for(InternalError("the server failed; see its log"))
        self.metrics.request_done(tenant, status, time.perf_counter() - started)
        return JSONResponse(body, status_code=status)

    async def _submit(self, item: WorkItem) -> tuple[int, dict[str, Any]]:
        uid = uuid.uuid4()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.metrics.queued(1)
        try:
            self.request_queue.put_nowait((self.response_queue_id, uid, time.monotonic(), item))
            await event.wait()
            response, status = self.response_buffer[uid].response
        finally:
            self.response_buffer.pop(uid, None)
            self.metrics.queued(-1)
        if status == LitAPIStatus.ERROR:
            # Only LitServe itself answers with errors (e.g. 504 on queue timeout); rows
            # that fail come back as answers with a status.
            if isinstance(response, HTTPException):
                kind = "QueueTimeout" if response.status_code == 504 else "HTTPError"
                return response.status_code, error_payload(kind, str(response.detail))
            return 500, error_payload("GenerationFailed", "the worker failed; see the log")
        return response["status"], response["body"]
