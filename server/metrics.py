"""Prometheus metrics, correct across the API process and every inference worker.

prometheus_client picks its multiprocess value store when it is first imported, from
PROMETHEUS_MULTIPROC_DIR; so `prepare_multiprocess_dir()` must run in the main process before
anything imports prometheus_client, and every child (forked API servers, spawned workers)
inherits the setting. `GET /metrics` merges all processes' files with MultiProcessCollector.

Metrics are created with `registry=None`: in multiprocess mode their values go to the shared
files whatever registry they are in, and several `Metrics` objects in one process (tests) must
not collide. Labels are bounded: tenants are the configured ones (anything else is "other"),
reasons and stages are fixed sets, statuses are HTTP codes, routes are the app's route
templates; prompts never become labels. A process has one `Metrics` object: two would each
cache a counter's value and overwrite each other's counts in the shared files.

Per-worker gauges are kept per worker slot (`worker` label, multiprocess mode
`livemostrecent`), not per process id: a replaced worker's series continues instead of a new
one appearing at every restart, and the supervisor drops the dead process's values.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Response
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patches.errors import ConceptGuardError
from server.errors import refusal_reason

if TYPE_CHECKING:
    from server.auth import Caller, KeyRing

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


def prepare_multiprocess_dir() -> Path:
    """A fresh, empty metrics directory for this server run, set in the environment."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before the metrics directory was set; its "
            "values would not be shared between processes"
        )
    path = Path(tempfile.mkdtemp(prefix="conceptguard-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def remove_multiprocess_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _started_files(path: Path) -> list[str]:
    """The metrics files under `path` that hold their header (8 bytes) at least."""
    started = []
    for file in path.glob("*.db"):
        try:
            if file.stat().st_size >= 8:
                started.append(str(file))
        except FileNotFoundError:  # its process was just marked dead
            continue
    return started


def render_latest() -> tuple[bytes, str]:
    """The merged metrics of every process, and their content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    class StartedFilesCollector(MultiProcessCollector):
        # A process creates its metrics file empty and sizes it a moment later; a scrape in
        # between failed on the empty file (500), which holds no samples yet: skip it.
        def collect(self):
            return self.merge(_started_files(Path(self._path)), accumulate=True)

    registry = CollectorRegistry()
    StartedFilesCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class Metrics:
    """Every ConceptGuard metric; also the patch runtime's `RuntimeEvents`."""

    def __init__(self, tenants: Iterable[str], worker: str = "api"):
        from prometheus_client import Counter, Gauge, Histogram

        self.tenants = frozenset(tenants)
        self.worker = worker
        self.requests = Counter(
            "conceptguard_requests",
            "Generation requests answered, by tenant and HTTP status",
            ["tenant", "status"],
            registry=None,
        )
        self.latency = Histogram(
            "conceptguard_request_seconds",
            "End-to-end generation latency in the API process",
            ["tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self.refusals = Counter(
            "conceptguard_refusals",
            "Requests refused, by reason (invalid_request, unauthorized, fail_closed, ...)",
            ["reason"],
            registry=None,
        )
        self.queue_wait = Histogram(
            "conceptguard_queue_wait_seconds",
            "Time from a request entering the queue to its batch starting on a worker",
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self.stage = Histogram(
            "conceptguard_stage_seconds",
            "Seconds per batch spent in each stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=None,
        )
        self.batch_size = Histogram(
            "conceptguard_batch_requests",
            "Requests per worker batch",
            buckets=_BATCH_BUCKETS,
            registry=None,
        )
        self.images = Counter(
            "conceptguard_images", "Images generated, by tenant", ["tenant"], registry=None
        )
        self.stack_loads = Counter(
            "conceptguard_patch_stack_loads",
            "Tenant stacks built by a worker; reload=true when replacing an earlier stack",
            ["reload"],
            registry=None,
        )
        self.stack_failures = Counter(
            "conceptguard_patch_stack_failures",
            "Tenant stacks that failed to load or verify (the tenant fails closed)",
            ["tenant", "error"],
            registry=None,
        )
        self.stack_build = Histogram(
            "conceptguard_patch_stack_build_seconds",
            "Seconds to load, verify and build one tenant stack",
            buckets=_STAGE_BUCKETS,
            registry=None,
        )
        self.dropped = Counter(
            "conceptguard_rows_dropped",
            "Requests a worker did not compute, or stopped computing, because nobody waited "
            "for them any more: reason=expired (past the queue timeout when taken), "
            "cancelled (answered by the API process: client gone, timeout, worker lost), "
            "stopped (its denoiser call was stopped: every row of it was cancelled)",
            ["reason"],
            registry=None,
        )
        self.in_flight = Gauge(
            "conceptguard_requests_in_flight",
            "Generation requests accepted and not yet answered (queued or generating): the "
            "queue depth to scale replicas on",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.routes = Counter(
            "conceptguard_http_requests",
            "Requests to every route but generation (conceptguard_requests_total), by route "
            "(METHOD /template, 'unmatched' for paths no route serves) and HTTP status: patch "
            "uploads, stack assignments, rollbacks, deletions, model listings, scrapes",
            ["route", "status"],
            registry=None,
        )
        self.generation = Gauge(
            "conceptguard_registry_generation",
            "Registry generation each worker last synced to (one series per worker slot)",
            ["worker"],
            multiprocess_mode="livemostrecent",
            registry=None,
        )
        self.warm_up = Gauge(
            "conceptguard_worker_warm_up_seconds",
            "How long each worker's warm-up generation took before it reported ready",
            ["worker"],
            multiprocess_mode="livemostrecent",
            registry=None,
        )
        self.compiled_graphs = Gauge(
            "conceptguard_compiled_graphs",
            "Graphs torch.compile traced in each worker (serve --compile): one per batch "
            "bucket after warm-up; a rise while serving is a recompilation",
            ["worker"],
            multiprocess_mode="livemostrecent",
            registry=None,
        )
        self.gpu_memory = Gauge(
            "conceptguard_gpu_memory_bytes",
            "GPU memory allocated by each worker (one series per worker slot)",
            ["worker"],
            multiprocess_mode="livemostrecent",
            registry=None,
        )

    def tenant_label(self, tenant: str | None) -> str:
        if tenant is None:
            return "none"
        return tenant if tenant in self.tenants else "other"

    # --- API process ---------------------------------------------------------------------

    def request_done(
        self,
        tenant: str | None,
        status: int,
        seconds: float | None,
        error: ConceptGuardError | None = None,
    ) -> None:
        label = self.tenant_label(tenant)
        self.requests.labels(tenant=label, status=str(status)).inc()
        if seconds is not None:
            self.latency.labels(tenant=label).observe(seconds)
        if status >= 400:
            self.refusals.labels(reason=refusal_reason(status, error)).inc()

    def route_done(self, route: str, status: int) -> None:
        """A request to any route but generation was answered with `status`."""
        self.routes.labels(route=route, status=str(status)).inc()
        if status >= 400:
            self.refusals.labels(reason=refusal_reason(status)).inc()

    def queued(self, delta: int) -> None:
        self.in_flight.inc(delta)

    # --- workers -------------------------------------------------------------------------

    def batch_started(self, size: int, queue_waits: Iterable[float]) -> None:
        self.batch_size.observe(size)
        for wait in queue_waits:
            self.queue_wait.observe(max(0.0, wait))

    def batch_done(self, timings: dict[str, float], images_by_tenant: dict[str, int]) -> None:
        for stage, seconds in timings.items():
            self.stage.labels(stage=stage).observe(seconds)
        for tenant, count in images_by_tenant.items():
            self.images.labels(tenant=self.tenant_label(tenant)).inc(count)

    def rows_dropped(self, reason: str, count: int = 1) -> None:
        self.dropped.labels(reason=reason).inc(count)

    def gpu_memory_bytes(self, value: int) -> None:
        self.gpu_memory.labels(worker=self.worker).set(value)

    def warmed_up(self, seconds: float) -> None:
        self.warm_up.labels(worker=self.worker).set(seconds)

    def graphs_compiled(self, count: int) -> None:
        self.compiled_graphs.labels(worker=self.worker).set(count)

    # --- RuntimeEvents -------------------------------------------------------------------

    def stack_built(self, tenant: str, reload: bool, seconds: float) -> None:
        self.stack_loads.labels(reload=str(reload).lower()).inc()
        self.stack_build.observe(seconds)

    def stack_failed(self, tenant: str, error: ConceptGuardError | Exception) -> None:
        self.stack_failures.labels(
            tenant=self.tenant_label(tenant), error=type(error).__name__
        ).inc()

    def generation_seen(self, generation: int) -> None:
        self.generation.labels(worker=self.worker).set(generation)


_process_metrics: tuple[int, Metrics] | None = None


def api_metrics(tenants: Iterable[str]) -> Metrics:
    """This API process's one Metrics object (the generation route and the middleware share
    it; see the module docstring)."""
    global _process_metrics
    if _process_metrics is None or _process_metrics[0] != os.getpid():
        _process_metrics = (os.getpid(), Metrics(tenants))
    return _process_metrics[1]


class RouteMetrics:
    """ASGI middleware counting every answered request except generation's (which the
    generation route counts itself, with its tenant): `conceptguard_http_requests_total` by
    route and status, and refusals by reason. Unknown paths (404) and wrong methods (405)
    are counted too."""

    def __init__(self, app: ASGIApp, tenants: Iterable[str], skip_path: str) -> None:
        """`skip_path`: the generation route's path."""
        self.app = app
        self.tenants = frozenset(tenants)
        self.skip_path = skip_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The generation route counts its own answers (not a 405 for another method).
        own = scope["type"] == "http" and scope["method"] == "POST"
        if scope["type"] != "http" or (own and scope["path"] == self.skip_path):
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaped

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            # The router puts the matched route into the scope (also on a 405).
            route = scope.get("route")
            template = getattr(route, "path", None)
            label = f"{scope['method']} {template}" if template else "unmatched"
            api_metrics(self.tenants).route_done(label, status)


def register_metrics_route(app: FastAPI, keys: KeyRing) -> None:
    """`GET /metrics` for a metrics key or the admin key (`Authorization: Bearer KEY`, what
    Prometheus sends with a scrape config's `authorization`): it shows every tenant's name
    and traffic, which no tenant may read of another. Never keys, prompts or images."""

    def scraper(request: Request) -> Caller:
        return keys.metrics(request.headers)

    @app.get("/metrics", dependencies=[Depends(scraper)], response_model=None)
    def metrics() -> Response:
        body, content_type = render_latest()
        return Response(content=body, media_type=content_type)
