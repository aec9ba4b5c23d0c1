"""The LitServe API that runs in each inference worker: batches of tenants' requests in,
one answer per row out.

Before each batch the worker brings its patch runtime up to date with the registry and takes
one snapshot; every row is served with the stack its tenant has in that snapshot, and the
response records that stack and the registry generation. A row whose tenant cannot be served
(fail closed) or whose generation fails gets an error answer; the other rows are unaffected.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import litserve as ls
import numpy as np
import torch

from patches.errors import ConceptGuardError
from server.batching_loop import BlockingBatchedLoop
from server.compiled import compile_pipeline, compiled_graphs, warm_up_rows
from server.config import ServerConfig
from server.errors import payload_for
from server.generation import Row, generate_batch
from server.images_spec import ImagesSpec
from server.runtime import RuntimeSnapshot, StackBuilding
from server.schemas import GenerationRecord, ImageGenerationRequest, WorkItem
from server.worker_health import CancelBoard, WorkerBeacon, run_dir_from_env

logger = logging.getLogger(__name__)

# How often an idle worker asks the registry for changes when nothing signalled one (a local
# registry has no signal; a database's signal could be lost with its connection). Tunable for
# tests that must tell the signal from the tick.
IDLE_REFRESH_S = float(os.environ.get("CONCEPTGUARD_IDLE_REFRESH_S", "1.0"))


@dataclass(frozen=True)
class ModelSettings:
    source: str
    device: str = "cpu"
    dtype: str = "float32"
    compile: str = "off"  # server/config.py COMPILE_MODES


class GenerationAPI(ls.LitAPI):
    """Loads the pipeline and the patch runtime once per worker; serves batches."""

    def __init__(
        self,
        settings: ModelSettings,
        config: ServerConfig,
        registry_path: str,
        native: int | None = None,
        workers: int = 1,
    ):
        """`native` (the model's native side) and `workers` are what the API process needs
        to bound and admit requests; a LitAPI used in-process only needs neither."""
        super().__init__(
            max_batch_size=config.batching.max_batch_size,
            batch_timeout=config.batching.batch_timeout_s,
            spec=ImagesSpec(config, native, workers),
            loop=BlockingBatchedLoop(),
        )
        self.settings = settings
        self.config = config
        self.registry_path = registry_path
        self.beacon: WorkerBeacon | None = None
        self.cancelled: CancelBoard | None = None
        self._reported: RuntimeSnapshot | None = None
        self.registry_changed: threading.Event | None = None
        self._refreshed_at = 0.0
        self._graced: set[tuple[str, ...]] = set()  # stacks in build already given the grace
        self.compiled = False

    def setup(self, device: str) -> None:
        from patches.loading import load_pipeline
        from patches.registry import open_registry
        from server.metrics import Metrics
        from server.runtime import PatchRuntime
        from server.text_encoding import prompt_encoder_for

        # Workers share few cores on small machines; one thread each avoids oversubscription.
        torch.set_num_threads(max(1, int(os.environ.get("CONCEPTGUARD_THREADS", "1"))))
        self.worker = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        run_dir = run_dir_from_env()
        if run_dir is not None:
            self.beacon = WorkerBeacon(run_dir, self.worker)
            self.cancelled = CancelBoard(run_dir)
        self.metrics = Metrics(self.config.tenants, worker=str(self.worker))
        self.pipe = load_pipeline(self.settings.source, self.settings.dtype, self.settings.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.encoder = prompt_encoder_for(self.pipe)
        # The server created or checked the registry before starting its workers: a worker
        # never creates one (a location that lost its registry fails every tenant closed).
        registry = open_registry(self.registry_path, create=False)
        self.runtime = PatchRuntime(registry, self.pipe, self.metrics)
        self.compiled = compile_pipeline(self.pipe, self.runtime.denoiser, self.settings.compile)
        # Set on every write to a database registry (by any replica), before the first
        # refresh, so nothing committed meanwhile goes unseen; None for a local registry.
        self.registry_changed = registry.change_signal()
        # Build every tenant's stack before this worker reports ready.
        self._report(self._refresh(wait=True))
        self._warm_up()

    def _warm_up(self) -> None:
        """One base-model generation at the native size before the worker reports ready,
        so the first request does not pay for kernel selection, allocations and lazy
        initialisation; compiled, one per batch bucket (each is a graph to compile). A
        worker that cannot generate at all fails its start-up here."""
        steps = self.config.batching.warm_up_steps
        if steps == 0:
            return
        request = ImageGenerationRequest(prompt="a warm-up image", n=1, steps=steps)
        batches = [1]
        if self.compiled:
            limits = self.config.limits
            batches = warm_up_rows(self.config.batching.max_batch_size * limits.max_images)
        started = time.perf_counter()
        for rows in batches:
            items = [
                WorkItem("warm-up", "", request, seed=i, enqueued_at=time.time())
                for i in range(rows)
            ]
            result = generate_batch(
                self.pipe,
                self.encoder,
                [Row(item, None) for item in items],
                self.config.limits,
                self.runtime.denoiser,
            )
            failed = [o for o in result.outputs if isinstance(o, Exception)]
            if failed:
                raise RuntimeError(f"the worker's warm-up generation failed: {failed[0]}")
        seconds = time.perf_counter() - started
        self.metrics.warmed_up(seconds)
        if self.compiled:
            self.metrics.graphs_compiled(compiled_graphs())
        logger.info(
            "worker %d warmed up in %.2f s (%d steps, batches of %s rows)",
            self.worker,
            seconds,
            steps,
            ", ".join(map(str, batches)),
        )

    def health(self) -> bool:
        """/health, in the API process: see ImagesSpec.healthy."""
        return self.spec.healthy()

    def decode_request(self, request: WorkItem) -> WorkItem:
        return request

    # --- what the worker loop calls (server/batching_loop.py) ----------------------------

    def serve_batch(self, items: list[WorkItem]) -> list[dict[str, Any] | None]:
        """Each item's encoded answer, or None for the rows of a tenant whose new stack is
        still being built (the loop holds them back and offers them again)."""
        answers = self._answer_batch(items, wait=False)
        return [None if a is None else self.encode_response(a) for a in answers]

    def idle(self) -> None:
        """Between requests: pick up registry changes and commit finished builds, so stacks
        are ready before their tenants' next requests - at once when the registry signals a
        change or a build finishes, else every IDLE_REFRESH_S."""
        if self.refresh_due() or time.monotonic() - self._refreshed_at >= IDLE_REFRESH_S:
            self._report(self._refresh())

    def watching(self) -> bool:
        """Whether something may call for a refresh while no request comes (the loop then
        waits for requests in short slices and asks `refresh_due` between them)."""
        return self.registry_changed is not None or self.runtime.building

    def refresh_due(self) -> bool:
        signalled = self.registry_changed is not None and self.registry_changed.is_set()
        return signalled or self.runtime.build_finished or self.runtime.changes_waiting

    def _refresh(self, wait: bool = False) -> RuntimeSnapshot:
        if self.registry_changed is not None:
            self.registry_changed.clear()  # before reading: a later write sets it again
        self._refreshed_at = time.monotonic()
        return self.runtime.refresh(wait=wait)

    def heartbeat(self) -> None:
        if self.beacon is not None:
            self.beacon.beat()
            self.cancelled.refresh()

    def abandoned(self, item: WorkItem) -> bool:
        return self.cancelled is not None and item.request_id in self.cancelled

    def forget(self, item: WorkItem, dropped: str | None = None) -> None:
        if dropped is not None:
            self.metrics.rows_dropped(dropped)
        if self.cancelled is not None:
            self.cancelled.refresh()  # one stat: cancelled while it was computed?
            self.cancelled.forget(item.request_id)

    def _keep_going(self, items: Sequence[WorkItem]) -> bool:
        """Per denoising step: a sign of life, registry changes read ahead (their builds
        start now, not at the next batch), and whether anybody waits for these rows."""
        self.heartbeat()
        self._prefetch()
        return not all(self.abandoned(item) for item in items)

    def _prefetch(self) -> None:
        # A database registry is read only when it signalled a write (one query); a local
        # one costs a stat of its state file per step.
        if self.registry_changed is not None:
            if not self.registry_changed.is_set():
                return
            self.registry_changed.clear()  # before reading: a later write sets it again
        try:
            self.runtime.prefetch()
        except Exception:  # never the batch's failure: the next refresh sees the same
            logger.exception("reading registry changes ahead failed")

    def _report(self, snapshot: RuntimeSnapshot) -> None:
        """Tell the API process (/health) when this worker serves nobody at all."""
        if self.beacon is None or snapshot is self._reported:
            return
        self._reported = snapshot
        reason = None
        if snapshot.registry_error is not None:
            reason = "the patch registry cannot be read"
        else:
            names = set(self.config.tenants) | set(snapshot.tenants)
            failing = [n for n in names if n in snapshot.tenants and snapshot.tenants[n].failure]
            if names and len(failing) == len(names):
                reason = f"every tenant's patch stack fails ({len(names)} tenants)"
        self.beacon.report(reason)

    def predict(self, x: WorkItem | list[WorkItem]) -> Any:
        """LitServe's interface (and the in-process tests'): waits for stacks being built."""
        items = x if isinstance(x, list) else [x]
        answers = self._answer_batch(items, wait=True)
        return answers if isinstance(x, list) else answers[0]

    def _answer_batch(self, items: list[WorkItem], wait: bool) -> list[dict[str, Any] | None]:
        batch_started = time.time()
        snapshot = self._refresh(wait=wait)
        if not wait:
            snapshot = self._await_quick_builds(snapshot, items)
        self._report(snapshot)
        answers: list[dict[str, Any] | None] = [{} for _ in items]
        rows, row_index, states = [], [], {}
        for i, item in enumerate(items):
            try:
                state = snapshot.state_for(item.tenant).require_ready()
                rows.append(Row(item, state.plan, state.denoiser))
            except StackBuilding:
                answers[i] = None
                continue
            except ConceptGuardError as exc:
                answers[i] = self._error(exc)
                continue
            row_index.append(i)
            states[i] = state
        if not rows:
            return answers
        served = [items[i] for i in row_index]
        self.metrics.batch_started(len(served), (batch_started - i.enqueued_at for i in served))
        result = generate_batch(
            self.pipe,
            self.encoder,
            rows,
            self.config.limits,
            self.runtime.denoiser,
            self._keep_going,
        )
        if result.stopped:
            self.metrics.rows_dropped("stopped", result.stopped)
        images_by_tenant: Counter[str] = Counter()
        for i, output in zip(row_index, result.outputs, strict=True):
            if isinstance(output, ConceptGuardError):
                answers[i] = self._error(output)
                continue
            state, item = states[i], items[i]
            images_by_tenant[item.tenant] += len(output)
            record = GenerationRecord(
                tenant=item.tenant,
                patches=list(state.stack),
                generation=snapshot.generation,
                tenant_generation=state.tenant_generation,
                seed=item.seed,
                worker=self.worker,
                batch_requests=len(items),
                batch_started_at=batch_started,
                timings={k: round(v, 4) for k, v in result.timings.items()},
                denoiser_calls=result.denoiser_calls,
            )
            answers[i] = {"status": 200, "images": output, "record": record}
        self.metrics.batch_done(result.timings, images_by_tenant)
        if self.compiled:
            self.metrics.graphs_compiled(compiled_graphs())
        if torch.cuda.is_available() and self.settings.device == "cuda":
            self.metrics.gpu_memory_bytes(torch.cuda.memory_allocated())
        return answers

    def _await_quick_builds(
        self, snapshot: RuntimeSnapshot, items: Sequence[WorkItem]
    ) -> RuntimeSnapshot:
        """Rows whose tenant's new stack is being built would wait a whole batch for the
        next; a build that finishes within the grace serves them in this one instead. Each
        build gets the grace once: a slow one does not delay every batch while it runs."""
        try:
            states = [snapshot.state_for(item.tenant) for item in items]
        except ConceptGuardError:
            return snapshot  # the registry is unreadable: every row fails closed anyway
        pending = {state.stack for state in states if state.pending}
        self._graced &= self.runtime.stacks_in_build
        fresh = pending - self._graced
        self._graced |= fresh
        if fresh and self.runtime.await_builds(fresh, self.config.batching.build_grace_s):
            return self._refresh()
        return snapshot

    @staticmethod
    def _error(exc: ConceptGuardError) -> dict[str, Any]:
        status, body = payload_for(exc)
        return {"status": status, "body": body}

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """One row's answer for the API process: an error's {"status", "body"}, or
        {"status": 200, "images": uint8 pixel arrays, "record": the GenerationRecord's
        fields}. The API process encodes the images in the format the request asks for
        (server/image_encoding.py), so this worker spends no time on PNG or base64."""
        if "body" in output:
            return output
        return {
            "status": 200,
            "images": [np.asarray(image, dtype=np.uint8) for image in output["images"]],
            "record": output["record"].model_dump(),
        }
