"""`POST /v1/images/generations` in the API process: authenticate, admit, validate, enqueue,
answer - always within bounds.

A LitServe spec (the same extension point as LitServe's OpenAI specs) owns the route, so the
API process - the only one that sees headers - resolves the tenant from the key and puts a
`WorkItem` carrying it on the worker queue. A client cannot name a tenant: the public request
model has no such field, and a body that tries is refused (400).

Workers answer every row with `{"status": code, "body": json}` instead of raising, because
LitServe's batched loop fails a whole batch on one exception; this endpoint turns a row's
answer into its HTTP response, so one tenant's failure never fails its batch neighbours.

Every request is answered, and on time (docs/API.md):
- admission (server/admission.py): a bounded number of requests, a per-tenant share of it
  (429 with Retry-After beyond), handed to the workers round robin by tenant;
- the queue timeout: a request no worker has started by then is answered 504 at that moment
  (not when a worker finally takes it), and marked cancelled so no worker computes it;
- workers (server/worker_health.py): a request taken by a worker that dies, or that shows
  no sign of life for `supervision.stuck_after_s`, is answered 503 WorkerLost;
- a client that disconnects: its request is marked cancelled (workers drop it, or stop the
  denoiser call if every row of it is cancelled);
- shutdown: waiting requests are answered 503 ShuttingDown.
A worker's late answer for a request answered here already finds nobody waiting for it and
is dropped (LitServe skips uids that are no longer in the response buffer).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.concurrency import run_in_threadpool

from patches.errors import ConceptGuardError
from server.admission import Admission, Ticket
from server.auth import KeyRing
from server.config import ServerConfig
from server.errors import (
    ClientDisconnected,
    InternalError,
    QueueTimeout,
    ShuttingDown,
    WorkerLost,
    error_payload,
    payload_for,
    response_headers,
)
from server.image_encoding import images_response
from server.request_body import read_json
from server.schemas import WorkItem, parse_request
from server.worker_health import CancelBoard, WorkerWatch, is_draining, run_dir_from_env

if TYPE_CHECKING:
    from server.metrics import Metrics

GENERATIONS_PATH = "/v1/images/generations"
MAX_REQUEST_BYTES = 1 << 20
# How often the API process looks at the workers, the cancelled markers and shutdown.
WATCH_INTERVAL_S = 0.25
SWEEP_INTERVAL_S = 60.0

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    """A request handed to the workers and not answered yet."""

    request_id: str
    event: asyncio.Event
    verdict: ConceptGuardError | None = None  # the API process's own answer, if any
    pid: int | None = field(default=None)  # the worker process that took it

    def decide(self, error: ConceptGuardError) -> None:
        if self.verdict is None:
            self.verdict = error
            self.event.set()


async def _client_gone(request: Request) -> None:
    """Returns when the client has disconnected (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ImagesSpec(LitSpec):
    """The OpenAI-images-shaped route, with tenants."""

    def __init__(self, config: ServerConfig, native: int = 512, workers: int = 1):
        super().__init__()
        self.api_path = GENERATIONS_PATH
        self.config = config
        self.native = native  # the served model's native side: default size, unit of work
        self.workers = workers
        self._keys: KeyRing | None = None
        self._metrics: Metrics | None = None
        self._admission: Admission | None = None
        self._pending: dict[Any, _Pending] = {}
        self._watchdog: asyncio.Task | None = None
        self._watch: WorkerWatch | None = None
        self._board: CancelBoard | None = None
        self._draining = False
        self._healthy: bool | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The spec travels to the workers with the LitAPI; API-process state stays behind.
        state = super().__getstate__()
        state.update(_metrics=None, _admission=None, _pending={}, _watchdog=None)
        state.update(_watch=None, _board=None)
        return state

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
            from server.metrics import api_metrics

            self._metrics = api_metrics(self.config.tenants)
        return self._metrics

    @property
    def admission(self) -> Admission:
        if self._admission is None:
            settings, batch = self.config.admission, self.config.batching.max_batch_size
            window = settings.window_for(self.workers, batch)
            self._admission = Admission(
                capacity=settings.in_flight_for(self.workers, batch),
                tenant_cap=settings.tenant_cap_for(self.workers, batch),
                window=window,
                tenant_window=max(1, int(settings.tenant_share * window)),
            )
        return self._admission

    # --- the route -----------------------------------------------------------------------

    async def generate(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        tenant, error, headers = None, None, {}
        try:
            tenant = self.keys.tenant(request.headers).tenant
            self._start_watchdog()
            if self._draining:
                raise ShuttingDown("the server is stopping; retry on another replica or later")
            ticket = self.admission.admit(tenant)
            try:
                body = await read_json(request, MAX_REQUEST_BYTES)
                parsed = parse_request(body, self.config.limits, self.native)
                seed = parsed.seed if parsed.seed is not None else secrets.randbelow(2**32)
                item = WorkItem(uuid.uuid4().hex, tenant, parsed, seed, time.time())
                answer = await self._submit(request, ticket, item)
                status, body = answer["status"], answer.get("body")
                if body is None:
                    # The worker sent pixels: encode them here, off the event loop.
                    body = await run_in_threadpool(images_response, answer, parsed)
            finally:
                self.admission.release(ticket)
        except ConceptGuardError as exc:
            error = exc
            status, body = payload_for(exc)
            headers = response_headers(exc)
        except Exception:
            # Still a JSON answer, and still counted: never a plain-text 500.
            logger.exception("generation request failed")
            status, body = payload_for(InternalError("the server failed; see its log"))
        self.metrics.request_done(tenant, status, time.perf_counter() - started, error)
        return JSONResponse(body, status_code=status, headers=headers)

    async def _submit(self, request: Request, ticket: Ticket, item: WorkItem) -> dict[str, Any]:
        """The worker's answer for `item`: {"status", "body"} for an error, {"status",
        "images", "record"} for images (server/generation_api.py)."""
        enqueued = time.monotonic()
        deadline = enqueued + self.config.batching.queue_timeout_s
        uid = uuid.uuid4()
        pending = _Pending(item.request_id, asyncio.Event())
        self._pending[uid] = pending
        gone = asyncio.ensure_future(_client_gone(request))
        queued = False
        self.metrics.queued(1)
        try:
            # 1. Wait for this tenant's turn to go to the workers' queue.
            turn = asyncio.ensure_future(self.admission.dispatch(ticket))
            try:
                await self._race(turn, pending, gone, deadline)
            finally:
                turn.cancel()
            # 2. The workers' queue, stamped with the arrival time: a worker drops a request
            # that is past the queue timeout when it takes it.
            self.response_buffer[uid] = ResponseBufferItem(event=pending.event)
            self.request_queue.put_nowait((self.response_queue_id, uid, enqueued, item))
            queued = True
            while not await self._race(None, pending, gone, deadline):
                if self.response_buffer[uid].worker_id is None:
                    # Past the queue timeout and no worker has started it: answer now.
                    raise QueueTimeout(self._timeout_message())
                deadline = None  # started: from here the worker watch bounds it
            if pending.verdict is not None:
                raise pending.verdict
            response, status = self.response_buffer[uid].response
        except ConceptGuardError:
            if queued:
                self._cancel(item.request_id)
            raise
        finally:
            gone.cancel()
            self.response_buffer.pop(uid, None)
            self._pending.pop(uid, None)
            self.metrics.queued(-1)
        if status == LitAPIStatus.ERROR:
            # Only LitServe itself answers with errors; rows that fail come back as answers
            # with a status.
            if isinstance(response, HTTPException):
                body = error_payload("HTTPError", str(response.detail))
                return {"status": response.status_code, "body": body}
            body = error_payload("GenerationFailed", "the worker failed; see the log")
            return {"status": 500, "body": body}
        return response

    async def _race(
        self,
        work: asyncio.Future | None,
        pending: _Pending,
        gone: asyncio.Future,
        deadline: float | None,
    ) -> bool:
        """Wait for `work` (or, with None, the answer) while watching for the client leaving,
        a verdict of the watchdog and `deadline`: True when it is done, False at the
        deadline; raises ClientDisconnected or the verdict."""
        answer = asyncio.ensure_future(pending.event.wait())
        waiters = {answer, gone} | ({work} if work is not None else set())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            answer.cancel()
        if gone in done:
            raise ClientDisconnected("the client closed the connection")
        if pending.verdict is not None:
            raise pending.verdict
        if not done:
            if work is not None:
                raise QueueTimeout(self._timeout_message())
            return False
        if work is not None:
            work.result()
        return True

    def _timeout_message(self) -> str:
        return (
            f"no worker started this request within the queue timeout "
            f"({self.config.batching.queue_timeout_s:g} s); it will not be computed. Retry later"
        )

    def _cancel(self, request_id: str) -> None:
        if self._board is not None:
            self._board.cancel(request_id)

    # --- the watchdog: dead or stuck workers, shutdown ------------------------------------

    def _start_watchdog(self) -> None:
        run_dir = run_dir_from_env()
        if self._watchdog is not None or run_dir is None:
            return
        self._watch = WorkerWatch(run_dir, self.workers, self.config.supervision.stuck_after_s)
        self._board = CancelBoard(run_dir)
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch_forever(), name="conceptguard-worker-watch"
        )

    async def _watch_forever(self) -> None:
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                self._watch_once()
                if time.monotonic() - last_sweep > SWEEP_INTERVAL_S:
                    last_sweep = time.monotonic()
                    self._sweep()
            except Exception:
                logger.exception("the worker watch failed; retrying")

    def _sweep(self) -> None:
        # A marker older than this belongs to a request no queue or batch can still hold
        # (the worker normally removes it when it drops the request).
        if self._board is not None:
            self._board.sweep(self.config.batching.queue_timeout_s + SWEEP_INTERVAL_S)

    def _watch_once(self) -> None:
        run_dir = run_dir_from_env()
        if run_dir is not None and not self._draining and is_draining(run_dir):
            self._draining = True
            for pending in self._pending.values():
                pending.decide(ShuttingDown("the server is stopping; retry later"))
        if self._watch is None or not self._pending:
            return
        views = {view.worker: view for view in self._watch.views()}
        for uid, pending in list(self._pending.items()):
            buffered = self.response_buffer.get(uid)
            view = views.get(buffered.worker_id) if buffered is not None else None
            if view is None or pending.verdict is not None:
                continue
            if pending.pid is None:
                pending.pid = view.pid  # the worker that took it, at first sight
            if not view.alive or view.pid != pending.pid:
                logger.error("worker %d died with request %s", view.worker, pending.request_id)
                pending.decide(
                    WorkerLost(f"the worker computing this request (worker {view.worker}) died")
                )
            elif view.stuck:
                pending.decide(
                    WorkerLost(
                        f"the worker computing this request (worker {view.worker}) has shown "
                        f"no progress for {view.silent_s:.0f} s"
                    )
                )

    def healthy(self) -> bool:
        """For /health: some worker is alive, making progress and serving some tenant (the
        registry readable, not every tenant failing closed), and the server is not stopping.
        LitServe adds: every worker has finished its setup."""
        run_dir = run_dir_from_env()
        if run_dir is None:
            return True
        if self._watch is None:
            self._watch = WorkerWatch(run_dir, self.workers, self.config.supervision.stuck_after_s)
        views = self._watch.views()
        healthy = not is_draining(run_dir) and any(view.serving for view in views)
        if healthy != self._healthy:
            self._healthy = healthy
            if not healthy:
                logger.error("health fails: %s", "; ".join(_describe(view) for view in views))
        return healthy


def _describe(view) -> str:
    if view.pid is None:
        return f"worker {view.worker} not started"
    if not view.alive:
        return f"worker {view.worker} (pid {view.pid}) is gone"
    if view.stuck:
        return f"worker {view.worker} silent for {view.silent_s:.0f} s"
    if view.serves_nobody:
        return f"worker {view.worker} serves nobody: {view.serves_nobody}"
    return f"worker {view.worker} serving"
