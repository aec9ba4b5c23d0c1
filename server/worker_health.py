"""Signs of life between the inference workers and the API process, through a run directory.

LitServe tells the API process which worker took a request (its START message) but not when
that worker died or stopped making progress; its own monitor lives in the main process and
fails only that process's (empty) response buffer. So `serve` makes a fresh run directory
(`$CONCEPTGUARD_RUN_DIR`, like the metrics directory) before LitServe starts its processes,
every process finds it in its environment, and `serve` removes it on exit:

    workers/<id>.json        one per worker slot, written by the worker holding it: its pid
                             and, when it serves nobody, why (the registry cannot be read,
                             every tenant fails closed); rewritten only when that changes.
                             Its mtime is the worker's last sign of life: touched between
                             batches, at least once a second while idle, and at every
                             denoising step (one utime, no write).
    cancelled/<request id>   requests nobody waits for any more (the client left; the API
                             process answered 504 or 503 instead): workers drop such rows
                             and stop a denoiser call all of whose rows are cancelled.
    draining                 present once the server is stopping.

The API process reads it cheaply: one stat per worker (a re-read only when a worker
rewrote its file), and workers one stat of `cancelled/` per check (a listing only when it
changed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RUN_DIR_ENV = "CONCEPTGUARD_RUN_DIR"
_WORKERS = "workers"
_CANCELLED = "cancelled"
_DRAINING = "draining"


def prepare_run_dir() -> Path:
    """A fresh run directory for this server run, set in the environment (children inherit
    it)."""
    path = Path(tempfile.mkdtemp(prefix="conceptguard-run-"))
    (path / _WORKERS).mkdir()
    (path / _CANCELLED).mkdir()
    os.environ[RUN_DIR_ENV] = str(path)
    return path


def remove_run_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_dir_from_env() -> Path | None:
    """This server run's directory; None outside `serve` (in-process tests)."""
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def start_draining(run_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (run_dir / _DRAINING).touch()


def is_draining(run_dir: Path) -> bool:
    return (run_dir / _DRAINING).exists()


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: os.kill's answer stands
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class WorkerBeacon:
    """A worker's side: its status file, and its sign of life."""

    def __init__(self, run_dir: Path, worker: int):
        self.path = run_dir / _WORKERS / f"{worker}.json"
        self._status: dict | None = None
        self.report("starting")

    def beat(self) -> None:
        """A sign of life (the status file's mtime becomes now)."""
        with contextlib.suppress(OSError):  # the run directory goes away at shutdown
            os.utime(self.path)

    def report(self, serves_nobody: str | None) -> None:
        """Why this worker serves no tenant at all (None: it serves); written on change."""
        status = {"pid": os.getpid(), "serves_nobody": serves_nobody}
        if status == self._status:
            self.beat()
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(status))
            os.replace(tmp, self.path)
            self._status = status


@dataclass(frozen=True)
class WorkerView:
    """What the API process knows of one worker slot."""

    worker: int
    pid: int | None  # None: no worker has written its status yet
    alive: bool
    silent_s: float  # since the last sign of life
    stuck: bool  # alive, but silent for longer than the limit
    serves_nobody: str | None

    @property
    def serving(self) -> bool:
        return self.alive and not self.stuck and self.serves_nobody is None


class WorkerWatch:
    """The API process's side: the state of every worker slot, from the run directory."""

    def __init__(self, run_dir: Path, workers: int, stuck_after_s: float):
        self.folder = run_dir / _WORKERS
        self.workers = workers
        self.stuck_after_s = stuck_after_s
        self._read: dict[int, tuple[tuple[int, int], dict]] = {}

    def _status(self, worker: int) -> tuple[dict | None, float]:
        path = self.folder / f"{worker}.json"
        try:
            stat = path.stat()
        except OSError:
            return None, 0.0
        key = (stat.st_ino, stat.st_size)
        cached = self._read.get(worker)
        if cached is None or cached[0] != key:
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                return None, 0.0
            self._read[worker] = cached = (key, status)
        return cached[1], stat.st_mtime

    def views(self) -> list[WorkerView]:
        now = time.time()
        views = []
        for worker in range(self.workers):
            status, beat = self._status(worker)
            if status is None:
                views.append(WorkerView(worker, None, False, 0.0, False, "not started"))
                continue
            pid = int(status["pid"])
            alive = _process_alive(pid)
            silent = max(0.0, now - beat)
            stuck = alive and silent > self.stuck_after_s
            views.append(WorkerView(worker, pid, alive, silent, stuck, status["serves_nobody"]))
        return views


class CancelBoard:
    """Requests nobody waits for any more, by request id (both sides)."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / _CANCELLED
        self._seen_ns = -1
        self._ids: frozenset[str] = frozenset()

    def cancel(self, request_id: str) -> None:
        with contextlib.suppress(OSError):
            (self.folder / request_id).touch()

    def refresh(self) -> None:
        """Catch up (one stat; a listing only when something was cancelled or forgotten)."""
        try:
            changed = os.stat(self.folder).st_mtime_ns
            if changed != self._seen_ns:
                self._ids = frozenset(os.listdir(self.folder))
                self._seen_ns = changed
        except OSError:
            self._ids = frozenset()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def forget(self, request_id: str) -> None:
        """The worker is done with a cancelled request: remove its marker."""
        if request_id in self._ids:
            with contextlib.suppress(OSError):
                (self.folder / request_id).unlink()

    def sweep(self, older_than_s: float) -> int:
        """Remove markers older than `older_than_s` (their requests can no longer be in any
        queue or batch); how many."""
        removed, limit = 0, time.time() - older_than_s
        with contextlib.suppress(OSError), os.scandir(self.folder) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
        return removed
