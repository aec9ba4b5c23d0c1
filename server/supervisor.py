"""The LitServe server, supervised: dead workers are replaced, and stopping is bounded.

LitServe 0.2.19 shuts the whole server down when one inference worker dies (its monitor's
default), after the 30 s it gives its API processes to finish; with `restart_workers` it
starts a replacement but fails the dead worker's requests only in the main process's
response buffer, which the forked API process does not share. Here:

- a worker that dies is replaced (a fresh process loads the model; /health is 503 until it
  is ready); its requests are answered 503 WorkerLost by the API process, which watches the
  workers itself (server/worker_health.py, server/images_spec.py);
- a replacement that fails its setup, or a worker slot that dies `MAX_DEATHS` times within
  `DEATH_WINDOW_S` (a crash loop: out of memory while loading, say), stops the server with a
  non-zero exit (`failure`), so the orchestrator restarts it rather than a half-working pod
  lingering;
- stopping (SIGTERM, Ctrl+C) tells the API process to answer every waiting request 503
  ShuttingDown at once, stops the workers within seconds (SIGKILL for ones that ignore
  SIGTERM, e.g. stopped), and gives open HTTP exchanges `shutdown_grace_s`; a second signal
  during that is ignored, so the stop always completes.

It also owns what LitServe 0.2.19 would otherwise decide for it: the listening socket
(bound by `serve` on any interface address, where LitServe accepts only 0.0.0.0, 127.0.0.1
and ::), and `/` and `/health` as plain text with their media type (LitServe's answer with
none, and its `/info` is left out: `GET /v1/models` says what is served).

It overrides private LitServe methods (`_start_worker_monitoring`,
`_perform_graceful_shutdown`, `_register_internal_endpoints`, `_start_server`), pinned by
tests that kill workers, stop servers, read /health and listen on other addresses.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi.responses import PlainTextResponse
from litserve.utils import WorkerSetupStatus

from server.worker_health import start_draining

logger = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.5
WORKER_STOP_S = 2.0
MAX_DEATHS = 3
DEATH_WINDOW_S = 300.0
# The hosts LitServe's run() accepts; any other address is passed to it as the wildcard of
# its family (the socket it listens on is ours either way).
_LITSERVE_HOSTS = ("0.0.0.0", "127.0.0.1", "::")
INDEX_TEXT = "ConceptGuard: POST /v1/images/generations; the API is described at /docs\n"


class SupervisedServer(ls.LitServer):
    def __init__(self, *args: Any, run_dir: Path | None, shutdown_grace_s: int, **kwargs: Any):
        super().__init__(*args, restart_workers=True, **kwargs)
        self.uvicorn_graceful_timeout = shutdown_grace_s
        self.run_dir = run_dir
        self.failure: str | None = None  # why the server stopped by itself
        self._stopping = threading.Event()
        self._restart_lock = threading.Lock()
        self._deaths: dict[int, list[float]] = {}  # per worker slot, time.monotonic()
        self._listen: socket.socket | None = None

    def run(self, listen: socket.socket, **kwargs: Any) -> None:
        """LitServe's run, serving on `listen` (a bound socket, server/http_protocol.py)."""
        host, port = listen.getsockname()[:2]
        if host not in _LITSERVE_HOSTS:
            host = "::" if listen.family == socket.AF_INET6 else "0.0.0.0"
        self._listen = listen
        # With `fd`, LitServe's uvicorn config takes a duplicate of our descriptor instead of
        # binding the host itself; `_start_server` hands uvicorn our socket.
        super().run(host=host, port=port, fd=listen.fileno(), **kwargs)

    def _start_server(
        self, port: Any, num_uvicorn_servers: int, log_level: str, sockets: list, *args: Any, **kw
    ) -> dict:
        for duplicate in sockets:
            duplicate.close()
        return super()._start_server(
            port, num_uvicorn_servers, log_level, [self._listen], *args, **kw
        )

    def _register_internal_endpoints(self) -> None:
        @self.app.get("/", response_class=PlainTextResponse)
        async def index() -> str:
            return INDEX_TEXT

        @self.app.get(self.healthcheck_path, response_class=PlainTextResponse)
        async def health() -> PlainTextResponse:
            healthy = await self._healthy()
            return PlainTextResponse(
                "ok" if healthy else "not ready", status_code=200 if healthy else 503
            )

    async def _healthy(self) -> bool:
        """LitServe's readiness: every worker set up, and every LitAPI's health() true."""
        status = getattr(self, "workers_setup_status", None)
        if not status or any(v != WorkerSetupStatus.READY for v in status.values()):
            return False
        for lit_api in self.litapi_connector:
            try:
                result = lit_api.health()
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                logger.exception("the health check of %s failed", type(lit_api).__name__)
                return False
            if not result:
                return False
        return True

    def _start_worker_monitoring(self, manager: Any, uvicorn_workers: dict) -> None:
        threading.Thread(
            target=self._monitor, daemon=True, name="conceptguard-worker-monitor"
        ).start()

    def _monitor(self) -> None:
        (lit_api,) = self.litapi_connector.lit_apis
        endpoint = lit_api.api_path.split("/")[-1]
        try:
            while not self._stopping.wait(MONITOR_INTERVAL_S):
                for worker, process in enumerate(self.inference_workers):
                    if self.workers_setup_status.get(f"{endpoint}_{worker}") == (
                        WorkerSetupStatus.ERROR
                    ):
                        self._fail(f"worker {worker} failed to set up (see the log above)")
                        return
                    if process.is_alive():
                        continue
                    now = time.monotonic()
                    deaths = [t for t in self._deaths.get(worker, []) if now - t < DEATH_WINDOW_S]
                    self._deaths[worker] = [*deaths, now]
                    if len(deaths) + 1 >= MAX_DEATHS:
                        self._fail(
                            f"worker {worker} died {MAX_DEATHS} times in {DEATH_WINDOW_S:g} s"
                        )
                        return
                    with self._restart_lock:
                        if self._stopping.is_set():
                            return
                        _forget_process_metrics(process.pid)
                        logger.error(
                            "worker %d (pid %s) died with exit code %s; starting a replacement",
                            worker,
                            process.pid,
                            process.exitcode,
                        )
                        self.inference_workers[worker] = self.launch_single_inference_worker(
                            lit_api, worker
                        )
        except Exception:
            if not self._stopping.is_set():
                logger.exception("the worker monitor failed")
                self._fail("the worker monitor failed")

    def _fail(self, reason: str) -> None:
        logger.error("stopping the server: %s", reason)
        self.failure = reason
        self._shutdown_event.set()  # LitServe's run() returns from its wait and stops

    def _perform_graceful_shutdown(
        self, manager: Any, uvicorn_workers: dict, shutdown_reason: str = "normal"
    ) -> None:
        if threading.current_thread() is threading.main_thread():
            # A second SIGTERM or Ctrl+C must not abort the stop half-way (orphans).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        with self._restart_lock:
            self._stopping.set()
        if self.run_dir is not None:
            start_draining(self.run_dir)
        self._stop_workers()
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    def _stop_workers(self) -> None:
        """SIGTERM every worker, wait for them together, SIGKILL what is left: a few seconds
        at most, where LitServe waits 5 s per worker that ignores SIGTERM."""
        workers = list(getattr(self, "inference_workers", []))
        for process in workers:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + WORKER_STOP_S
        for process in workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in workers:
            if process.is_alive():
                logger.warning("worker pid %s did not stop on SIGTERM; killing it", process.pid)
                process.kill()
                process.join(timeout=WORKER_STOP_S)


def _forget_process_metrics(pid: int | None) -> None:
    """Drop a dead worker's per-process gauge values (its replacement writes its own)."""
    from prometheus_client import multiprocess

    from server.metrics import MULTIPROC_ENV

    if pid is not None and os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
