"""LitServe's batched worker loop, changed in one respect: an idle worker blocks on the queue.

LitServe 0.2.19 collects a batch by polling the shared queue in 1 ms steps for the whole
`batch_timeout`, again and again while idle; each poll is a round trip to the queue's manager
process, which costs an idle two-worker server about a third of a core. This loop waits (up
to a second at a time) for the first request, then collects more for at most
`batch_timeout`, and hands the batch to LitServe's own `run_batched_loop` unchanged.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_WAIT_S = 1.0


class BlockingBatchedLoop(BatchedLoop):
    def get_batch_requests(self, lit_api: Any, request_queue: Any, transport: Any):
        payloads: list[tuple] = []
        timed_out: list[tuple] = []
        deadline: float | None = None
        limit = lit_api.request_timeout
        while len(payloads) + len(timed_out) < lit_api.max_batch_size:
            wait = IDLE_WAIT_S if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                request = request_queue.get(timeout=wait)
            except Empty:
                break
            if request == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, x_enc = request
            self.put_response(
                transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR
            )
            if deadline is None:
                deadline = time.monotonic() + lit_api.batch_timeout
            if limit not in (-1, False, None) and time.monotonic() - timestamp > limit:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, x_enc))
        return payloads, timed_out
