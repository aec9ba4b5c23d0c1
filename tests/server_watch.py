"""Looking at a running test server from outside: its inference workers, its metrics, its run
directory - and waiting, boundedly, for one of them to reach a state."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families
from tenant_server import TenantServer

T = TypeVar("T")


def workers(server: TenantServer) -> list[psutil.Process]:
    """The server's inference workers (spawned children of its main process)."""
    main = psutil.Process(server.process.process.pid)
    found = []
    for child in main.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != "zombie":
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def the_worker(server: TenantServer) -> psutil.Process:
    (worker,) = workers(server)
    return worker


def metric(server: TenantServer, name: str, **labels: str) -> float:
    """A metric summed over processes (and over labels not given)."""
    total = 0.0
    for family in text_string_to_metric_families(server.metrics_text()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def run_dir(server: TenantServer) -> Path:
    """The server's run directory (server/worker_health.py), from a worker's environment
    (spawned with it; the main process set it after it started)."""
    return Path(workers(server)[0].environ()["CONCEPTGUARD_RUN_DIR"])


def health(server: TenantServer) -> int:
    return requests.get(server.url + "/health", timeout=10).status_code


def wait_for(what: str, probe: Callable[[], T], seconds: float = 60.0, every: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy (returned), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {seconds} s: {what}")
        time.sleep(every)  # polling period of a bounded wait, not synchronisation
