"""Issue 17, items 6 and 10, against a real server (one worker, the tiny SD pipeline,
127.0.0.1): a killed worker is replaced and its requests answered, /health fails while no
worker can serve anybody (stuck, gone, the registry unreadable, every tenant failing closed)
and recovers, and SIGTERM stops a server with hung requests within 20 s."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import run_conceptguard, text_encoder_patch
from server_process import port_is_open
from server_watch import health, metric, the_worker, wait_for
from tenant_server import start_tenant_server

STUCK_AFTER_S = 3
HEAVY = {"size": "128x128", "steps": 100}  # 400 image-steps: the default budget


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd_model_path):
    running = start_tenant_server(
        tmp_path_factory.mktemp("hardening-workers"),
        sd_model_path,
        workers=1,
        batching={"max_batch_size": 4, "batch_timeout_s": 0.05, "queue_timeout_s": 60},
        supervision={"stuck_after_s": STUCK_AFTER_S},
    )
    yield running
    running.process.stop()


def _error(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["type"]


def _batches(server) -> float:
    return metric(server, "conceptguard_batch_requests_count")


def _heavy_request_running(server, pool, tenant="a"):
    """A heavy request, returned once its batch has started on the worker."""
    batches = _batches(server)
    future = pool.submit(server.generate, tenant, **HEAVY)
    wait_for("the heavy batch started", lambda: _batches(server) > batches, every=0.02)
    return future


def test_a_killed_worker_is_replaced_and_no_request_hangs(server):
    dead = the_worker(server)
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = _heavy_request_running(server, pool)
        queued = pool.submit(server.generate, "b")  # waits in the queue behind it
        dead.kill()
        lost = running.result(timeout=60)
        assert _error(lost) == (503, "WorkerLost"), lost.text
        assert lost.headers["Retry-After"] == "5"
        assert "(worker 0) died" in lost.json()["detail"]
        # Not ready while the replacement loads; ready again once it has.
        wait_for("/health fails", lambda: health(server) == 503)
        wait_for("/health recovers", lambda: health(server) == 200, seconds=180)
        served = queued.result(timeout=120)  # the replacement serves what was queued
    assert served.status_code == 200, served.text
    replacement = the_worker(server)  # exactly one worker again
    assert replacement.pid != dead.pid
    assert server.generate("c").status_code == 200
    assert "starting a replacement" in server.process.log.read_text()


def test_health_fails_while_every_worker_is_stuck(server):
    stopped = metric(server, "conceptguard_rows_dropped_total", reason="stopped")
    worker = the_worker(server)
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = _heavy_request_running(server, pool)
        worker.suspend()
        try:
            # Before issue 17: /health stayed 200 and the request waited for the worker.
            lost = running.result(timeout=60)
            assert _error(lost) == (503, "WorkerLost"), lost.text
            assert "has shown no progress for" in lost.json()["detail"]
            wait_for("/health fails", lambda: health(server) == 503)
        finally:
            worker.resume()
    wait_for("/health recovers", lambda: health(server) == 200)
    # The resumed worker stops the call nobody waits for any more.
    wait_for(
        "the abandoned call stopped",
        lambda: metric(server, "conceptguard_rows_dropped_total", reason="stopped") == stopped + 1,
    )
    assert server.generate("b").status_code == 200


def test_health_fails_while_no_tenant_can_be_served(server, tiny_sd, tmp_path):
    state, moved = server.registry / "state.json", tmp_path / "state.json"
    shutil.move(state, moved)
    try:
        wait_for("/health fails: the registry cannot be read", lambda: health(server) == 503)
        assert _error(server.generate("a")) == (503, "RegistryUnavailable")
    finally:
        shutil.move(moved, state)
    wait_for("/health recovers", lambda: health(server) == 200)

    patch = text_encoder_patch(tiny_sd, seed=51)
    uploaded = server.admin("POST", "/v1/patches", params={"name": "doomed"}, data=patch.to_bytes())
    assert uploaded.status_code == 201, uploaded.text
    (server.registry / "blobs" / f"{patch.id}.safetensors").write_bytes(b"damaged" * 40)
    tenants = ["a", "b", "c", "d"]
    try:
        for tenant in tenants:
            assigned = server.admin("PUT", f"/v1/tenants/{tenant}", json={"patches": ["doomed"]})
            assert assigned.status_code == 200, assigned.text
        wait_for("/health fails: every tenant fails closed", lambda: health(server) == 503)
        assert _error(server.generate("a")) == (503, "StackNotReady")
        assert server.admin("PUT", "/v1/tenants/d", json={"patches": []}).status_code == 200
        wait_for("/health recovers: d is served", lambda: health(server) == 200)
    finally:
        for tenant in tenants:
            server.admin("PUT", f"/v1/tenants/{tenant}", json={"patches": []})


def test_serve_can_require_an_existing_registry(tmp_path, sd_model_path):
    location = tmp_path / "registry"
    serve = ("serve", "--model", str(sd_model_path), "--registry", str(location))
    refused = run_conceptguard(*serve, "--registry-create", "never")
    assert refused.returncode == 2, refused.stderr
    assert "RegistryStateMissing: there is no registry here" in refused.stderr
    assert not location.exists()  # nothing was created
    init = ("registry", "--dir", str(location), "init", "--exist-ok")
    assert run_conceptguard(*init).returncode == 0
    again = run_conceptguard(*init)
    assert again.returncode == 0 and "a registry exists at" in again.stdout


def test_sigterm_with_hung_requests_stops_within_20_s(server):
    """Last: it stops the module's server."""
    worker = the_worker(server)
    process = server.process.process
    with ThreadPoolExecutor(max_workers=3) as pool:
        worker.suspend()  # a worker that never answers (nor heeds SIGTERM)
        hung = [pool.submit(server.generate, tenant) for tenant in "abc"]
        wait_for(
            "three requests wait", lambda: metric(server, "conceptguard_requests_in_flight") == 3
        )
        started = time.monotonic()
        process.terminate()
        # Before issue 17 this took over 30 s (uvicorn's graceful timeout, then 5 s per worker).
        assert process.wait(timeout=20) == 0
        answers = [f.result(timeout=10) for f in hung]
    print(f"\nSIGTERM with 3 hung requests: stopped in {time.monotonic() - started:.1f} s")
    for answer in answers:
        assert _error(answer) == (503, "ShuttingDown"), answer.text
        assert answer.headers["Retry-After"] == "5"
    wait_for("no process of the group is left", lambda: not _group(process.pid), seconds=20)
    assert not port_is_open(server.process.port)


def _group(pgid: int) -> str:
    return subprocess.run(
        ["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True
    ).stdout.strip()
