"""A soak test: a real server (one worker, the tiny SD pipeline) under a mix of everything it
must survive - valid requests of several tenants, refused ones, clients that leave mid-request,
connections that stall, patches registered, assigned, rolled back and deleted - for
CONCEPTGUARD_SOAK_S seconds (20 by default, for CI; run it for minutes by hand:
`CONCEPTGUARD_SOAK_S=600 pytest tests/test_soak.py -s`). Afterwards every process's resident
memory and open files are where they were after the warm-up, no process came or went, and the
registry holds exactly the files its records name (no orphan blobs, nothing in tmp/)."""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import run_conceptguard, text_encoder_patch
from raw_http import api_process, open_request
from server_watch import metric, run_dir, wait_for
from tenant_server import GENERATE, TENANT_KEYS, start_tenant_server

SOAK_S = float(os.environ.get("CONCEPTGUARD_SOAK_S", "20"))
MiB = 2**20
# Growth allowed after the warm-up: allocator and cache noise, not a leak per request.
RSS_GROWTH = 48 * MiB
FD_GROWTH = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd_model_path):
    running = start_tenant_server(
        tmp_path_factory.mktemp("soak"),
        sd_model_path,
        workers=1,
        batching={"max_batch_size": 4, "batch_timeout_s": 0.02, "queue_timeout_s": 10},
        http={"header_timeout_s": 1, "body_timeout_s": 1},
    )
    yield running
    running.process.stop()


def _processes(server) -> dict[int, psutil.Process]:
    main = psutil.Process(server.process.process.pid)
    group = [main, *main.children(recursive=True)]
    return {p.pid: p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def _role(process: psutil.Process, server, api: int) -> str:
    command = " ".join(process.cmdline())
    if process.pid == server.process.process.pid:
        return "main"
    if process.pid == api:
        return "API server"
    if "spawn_main" in command:
        return "inference worker"
    if "resource_tracker" in command:
        return "resource tracker"
    return "multiprocessing manager"


def _usage(server) -> dict[int, tuple[int, int, str]]:
    """Per process: resident bytes, open file descriptors, its role (for messages)."""
    api = api_process(server.process.port).pid
    return {
        pid: (p.memory_info().rss, p.num_fds(), _role(p, server, api))
        for pid, p in _processes(server).items()
    }


def _cycle(server, pool, tiny_sd, k: int) -> None:
    """One round of everything, k-th time."""
    port = server.process.port
    valid = [pool.submit(server.generate, t, seed=k) for t in "abc"]
    assert server.generate("a", size="4096x4096").status_code == 400
    assert server.generate("b", prompt="bad \x00").status_code == 400
    # A client that leaves mid-request, and connections that stall (closed by the server).
    body = b'{"prompt": "a red circle", "steps": 20}'
    leaving = open_request(
        port,
        "POST",
        GENERATE,
        [("Authorization", f"Bearer {TENANT_KEYS['d']}"), ("Content-Length", str(len(body)))],
        body,
    )
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    stalled.sendall(b"POST /v1/patches HTTP/1.1\r\nHost: x\r\n")
    half = open_request(
        port,
        "POST",
        GENERATE,
        [("Authorization", f"Bearer {TENANT_KEYS['c']}"), ("Content-Length", "100")],
        b'{"prompt"',
        timeout=10,
    )
    leaving.close()
    # A patch's whole life: registered, assigned, rolled back, unassigned, deleted.
    patch = text_encoder_patch(tiny_sd, seed=1000 + k)
    pushed = server.admin("POST", "/v1/patches", params={"name": f"soak{k}"}, data=patch.to_bytes())
    assert pushed.status_code == 201, pushed.text
    assert server.admin("PUT", "/v1/tenants/b", json={"patches": []}).status_code == 200
    assert server.admin("PUT", "/v1/tenants/b", json={"patches": [patch.id]}).status_code == 200
    assert server.image("b", seed=k)[1]["patches"] == [patch.id]
    rolled_back = server.admin("POST", "/v1/tenants/b/rollback")
    assert rolled_back.status_code == 200 and rolled_back.json()["stack"] == [], rolled_back.text
    assert server.admin("DELETE", f"/v1/patches/{patch.id}").status_code == 200
    for future in valid:
        assert future.result().status_code == 200
    for sock in (stalled, half):
        assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
        sock.close()


def test_soak(server, tiny_sd):
    with ThreadPoolExecutor(max_workers=4) as pool:
        for k in range(3):  # warm-up: first-time costs (imports, caches, allocator pools)
            _cycle(server, pool, tiny_sd, k)
        wait_for("idle", lambda: metric(server, "conceptguard_requests_in_flight") == 0)
        before = _usage(server)
        deadline, k = time.monotonic() + SOAK_S, 3
        while time.monotonic() < deadline:
            _cycle(server, pool, tiny_sd, k)
            k += 1
    wait_for("idle", lambda: metric(server, "conceptguard_requests_in_flight") == 0)
    after = _usage(server)
    print(f"\nsoak: {k - 3} cycles in {SOAK_S:g} s")
    for pid, (rss, fds, cmd) in sorted(before.items()):
        grown = after[pid][0] / MiB
        print(
            f"  {pid} {cmd}: RSS {rss / MiB:.0f} -> {grown:.0f} MiB, fds {fds} -> {after[pid][1]}"
        )
    assert after.keys() == before.keys(), "a process came or went"
    for pid, (rss, fds, cmd) in before.items():
        assert after[pid][0] - rss < RSS_GROWTH, (
            f"{cmd}: RSS grew by {(after[pid][0] - rss) / MiB:.0f} MiB"
        )
        assert after[pid][1] - fds <= FD_GROWTH, f"{cmd}: {after[pid][1] - fds} more open files"

    registry = server.registry
    records = server.admin("GET", "/v1/patches").json()
    named = {f"{record['id']}.safetensors" for record in records["patches"]}
    assert {p.name for p in (registry / "blobs").iterdir()} == named, "orphan or missing blobs"
    assert not list((registry / "tmp").iterdir()), "files left in the registry's tmp/"
    check = run_conceptguard("registry", "--dir", str(registry), "check")
    assert check.returncode == 0, check.stdout + check.stderr
    cancelled = run_dir(server) / "cancelled"
    wait_for("cancelled markers removed", lambda: not list(cancelled.iterdir()), seconds=30)
