"""The inference worker's loop: LitServe's batched loop, reshaped for tenants.

LitServe 0.2.19's own loop polls the shared queue in 1 ms steps while idle (a round trip to
the queue's manager process each time: a third of a core for two idle workers), answers all
of a batch only when all of it is done, and checks a request's deadline only when it takes
it from the queue. This loop:
- waits (up to a second at a time) for the first request, then collects more for at most
  `batch_timeout`;
- answers a request that waited longer than the queue timeout with 504, without computing
  it - when it is taken from the queue, and again while it waits for its stack (the API
  process has answered it by then; this answer finds nobody and is dropped);
- drops, without an answer, requests nobody waits for any more (the API process marked them
  cancelled: their client left, or it answered them itself);
- gives a sign of life at every pass (at least once a second while idle), which the API
  process's worker watch and /health read (server/worker_health.py);
- holds back the rows of tenants whose new patch stack is still being built (the LitAPI
  answers them with None, after giving the build `build_grace_s`): they join a later batch
  once it is ready, while every other tenant's rows are served at once - one tenant's stack
  change delays another by that grace at most, once;
- lets the LitAPI do housekeeping while idle (registry changes are picked up and built
  before the next request arrives): at once when it signals that some is due (a database
  registry's change notification, a finished build), else once per idle pass.
It imports LitServe's private sentinel and stop exception, pinned by the tests that stop
servers cleanly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from queue import Empty
from typing import Any, Protocol

from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from server.errors import QueueTimeout, payload_for

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0
# How often rows waiting for their stack are looked at again.
WAITING_POLL_S = 0.02
# While idle and watching (a registry change signal, builds in flight): how often the
# LitAPI is asked whether a refresh is due - one queue round trip each.
WAKE_POLL_S = 0.05


class TenantWorker(Protocol):
    """What the loop needs from the LitAPI (server/generation_api.py)."""

    max_batch_size: int
    batch_timeout: float
    request_timeout: float

    def serve_batch(self, items: list[Any]) -> list[dict[str, Any] | None]:
        """One encoded answer per item, or None for an item that must wait for its stack."""

    def idle(self) -> None:
        """Housekeeping between requests."""

    def watching(self) -> bool:
        """Whether `refresh_due` may become true while no request comes."""

    def refresh_due(self) -> bool:
        """Whether housekeeping should not wait for the next request or idle pass."""

    def heartbeat(self) -> None:
        """A sign of life; also catches up with the requests marked cancelled."""

    def abandoned(self, item: Any) -> bool:
        """Whether nobody waits for `item` any more."""

    def forget(self, item: Any, dropped: str | None = None) -> None:
        """The loop is done with `item` (answered, or `dropped` for that reason)."""


@dataclass
class _Request:
    response_queue_id: int
    uid: str
    enqueued: float  # time.monotonic() in the API process (the same clock on one machine)
    item: Any


def _timed_out(limit: float) -> dict[str, Any]:
    status, body = payload_for(
        QueueTimeout(
            f"the request waited more than {limit:g} s for a worker and was not computed; "
            "retry later"
        )
    )
    return {"status": status, "body": body}


class BlockingBatchedLoop(BatchedLoop):
    def _expired(self, lit_api: TenantWorker, request: _Request) -> bool:
        limit = lit_api.request_timeout
        return limit not in (-1, False, None) and time.monotonic() - request.enqueued > limit

    def _collect(
        self, lit_api: TenantWorker, request_queue: Any, transport: Any, room: int, wait: float
    ) -> list[_Request]:
        """Up to `room` new requests: wait up to `wait` for the first - in slices, returning
        early when the LitAPI has housekeeping due - then up to the batch timeout for more."""
        taken: list[_Request] = []
        if room == 0:  # a full batch already waits for its stacks
            time.sleep(wait)
            return taken
        idle_until = time.monotonic() + wait
        deadline: float | None = None
        while len(taken) < room:
            if deadline is None:
                if lit_api.refresh_due():
                    break
                remaining = idle_until - time.monotonic()
                step = min(remaining, WAKE_POLL_S) if lit_api.watching() else remaining
            else:
                remaining = step = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                request = request_queue.get(timeout=step)
            except Empty:
                if step < remaining:  # one slice of the wait for the first request
                    continue
                break
            if request == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, item = request
            self.put_response(
                transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR
            )
            taken.append(_Request(response_queue_id, uid, timestamp, item))
            if deadline is None:
                deadline = time.monotonic() + lit_api.batch_timeout
        return taken

    def _answer(self, transport: Any, request: _Request, answer: dict[str, Any]) -> None:
        self.put_response(
            transport,
            request.response_queue_id,
            request.uid,
            answer,
            LitAPIStatus.OK,
            LoopResponseType.REGULAR,
        )

    def run_batched_loop(
        self,
        lit_api: Any,
        request_queue: Any,
        transport: Any,
        callback_runner: Any,
        lit_spec: Any = None,
    ) -> None:
        waiting: list[_Request] = []
        while True:
            room = max(0, lit_api.max_batch_size - len(waiting))
            try:
                fresh = self._collect(
                    lit_api,
                    request_queue,
                    transport,
                    room,
                    WAITING_POLL_S if waiting else IDLE_WAIT_S,
                )
            except _StopLoopError:
                logger.debug("received the sentinel: stopping the worker loop")
                return
            except KeyboardInterrupt:  # pragma: no cover
                self.kill()
                return
            lit_api.heartbeat()  # also catches up with cancellations, for what it just took
            # Rows held back for their stack go first: they arrived earlier.
            batch = []
            for request in waiting[: lit_api.max_batch_size] + fresh:
                if lit_api.abandoned(request.item):
                    lit_api.forget(request.item, dropped="cancelled")
                elif self._expired(lit_api, request):
                    self._answer(transport, request, _timed_out(lit_api.request_timeout))
                    lit_api.forget(request.item, dropped="expired")
                else:
                    batch.append(request)
            waiting = waiting[lit_api.max_batch_size :]
            if not batch:
                lit_api.idle()
                continue
            try:
                answers = lit_api.serve_batch([r.item for r in batch])
            except KeyboardInterrupt:  # pragma: no cover
                self.kill()
                return
            except Exception as exc:
                logger.exception("the worker failed on a batch of %d", len(batch))
                for request in batch:
                    self.put_error_response(transport, request.response_queue_id, request.uid, exc)
                    lit_api.forget(request.item)
                continue
            for request, answer in zip(batch, answers, strict=True):
                if answer is None:
                    waiting.append(request)
                else:
                    self._answer(transport, request, answer)
                    lit_api.forget(request.item)
