"""A `conceptguard serve` process group for serving benchmarks (loopback only): start it with
generated keys and a fresh registry, talk to it, find its workers, stop it completely."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from server.config import hash_key

ADMIN_KEY = "bench-admin-key"
GENERATE = "/v1/images/generations"


def tenant_key(tenant: str) -> str:
    return f"bench-key-{tenant}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class BenchServer:
    process: subprocess.Popen
    port: int
    log: Path
    session: requests.Session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generate(self, tenant: str, body: dict[str, Any], timeout: float = 300):
        headers = {"Authorization": f"Bearer {tenant_key(tenant)}"}
        return requests.post(self.url + GENERATE, json=body, headers=headers, timeout=timeout)

    def admin(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        response = self.session.request(
            method, self.url + path, headers=headers, timeout=120, **kwargs
        )
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text}")
        return response.json()

    def push(self, data: bytes, name: str) -> dict[str, Any]:
        return self.admin("POST", "/v1/patches", params={"name": name}, data=data)

    def assign(self, tenant: str, stack: list[str]) -> dict[str, Any]:
        return self.admin("PUT", f"/v1/tenants/{tenant}", json={"patches": stack})

    def worker_pids(self) -> list[int]:
        """The inference workers: spawned children in the server's process group."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            pgid = int(stat.rsplit(")", 1)[1].split()[2])
            if pgid == self.process.pid and b"spawn_main" in cmdline:
                pids.append(int(entry.name))
        return sorted(pids)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_bench_server(
    folder: Path,
    model: str,
    tenants: list[str],
    workers: int = 2,
    batching: dict[str, Any] | None = None,
    extra_args: list[str] | None = None,
    ready_s: float = 300,
    registry: str | None = None,
) -> BenchServer:
    """`registry`: a location several servers share (a database URL, a directory); default a
    new directory in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "tenants": {t: {"keys": [hash_key(tenant_key(t))]} for t in tenants},
        "admin_keys": [hash_key(ADMIN_KEY)],
        "batching": batching or {},
    }
    (folder / "config.json").write_text(json.dumps(config))
    port = _free_port()
    log = folder / "server.log"
    args = [sys.executable, "-m", "conceptguard.cli", "serve", "--port", str(port)]
    location = registry or str(folder / "registry")
    args += ["--model", model, "--workers", str(workers), "--registry", location]
    args += ["--config", str(folder / "config.json"), *(extra_args or [])]
    with open(log, "w") as handle:
        process = subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
    server = BenchServer(process, port, log, requests.Session())
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_s} s:\n{log.read_text()}")


# The stages a worker times per batch (server/generation.py), as /metrics labels them.
STAGES = ("text_encode", "denoise", "decode")


def stage_sums(server: BenchServer) -> dict[str, float]:
    """Seconds per stage summed over the workers, the batch count, and the stack builds and
    their seconds, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = requests.get(server.url + "/metrics", headers=headers, timeout=30)
    response.raise_for_status()
    text = response.text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "conceptguard_stage_seconds_sum":
                stage = sample.labels["stage"]
                sums[stage] = sums.get(stage, 0.0) + sample.value
            elif sample.name == "conceptguard_batch_requests_count":
                sums["batches"] = sums.get("batches", 0.0) + sample.value
            elif sample.name == "conceptguard_patch_stack_build_seconds_sum":
                sums["stack_build_s"] = sums.get("stack_build_s", 0.0) + sample.value
            elif sample.name == "conceptguard_patch_stack_build_seconds_count":
                sums["stack_builds"] = sums.get("stack_builds", 0.0) + sample.value
    return sums


def timed_phase(
    server: BenchServer, jobs: Sequence[tuple[str, dict[str, Any]]], clients: int
) -> dict[str, Any]:
    """Send (tenant, body) jobs from `clients` threads: images/s, seconds, batches, each
    stage's seconds per batch, and the `conceptguard` record of every response."""

    def send(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        tenant, body = job
        response = server.generate(tenant, body)
        if response.status_code != 200:
            raise RuntimeError(f"{tenant}: HTTP {response.status_code}: {response.text[:300]}")
        payload = response.json()
        return {**payload["conceptguard"], "images": len(payload["data"])}

    before = stage_sums(server)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        records = list(pool.map(send, jobs))
    seconds = time.perf_counter() - started
    after = stage_sums(server)
    batches = max(1.0, after.get("batches", 0) - before.get("batches", 0))
    result: dict[str, Any] = {
        "images_per_s": sum(r["images"] for r in records) / seconds,
        "seconds": seconds,
        "batches": batches,
    }
    for stage in STAGES:
        result[f"{stage}_s_per_batch"] = (after.get(stage, 0.0) - before.get(stage, 0.0)) / batches
    result["records"] = records
    return result
