"""A real server on a PostgreSQL registry (issue 20), on a database server of its own: an
idle worker is woken by the database's notification (not by its idle tick), and a database
outage under load fails every tenant closed, never serves a wrong stack, and heals by itself.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import text_encoder_patch
from pg_server import own_server
from prometheus_client.parser import text_string_to_metric_families
from tenant_server import start_tenant_server

from patches.registry import open_registry

# Long enough that only the database's notification can explain a prompt pick-up.
IDLE_REFRESH_S = 3600
OUTAGE_S = 10


@pytest.fixture(scope="module")
def database():
    server = own_server()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def server(database, tmp_path_factory, sd_model_path):
    dsn = database.create_database("serving")
    open_registry(dsn, create=True).close()
    running = start_tenant_server(
        tmp_path_factory.mktemp("pg-serving"),
        sd_model_path,
        workers=1,
        registry=dsn,
        env={"CONCEPTGUARD_IDLE_REFRESH_S": str(IDLE_REFRESH_S)},
    )
    yield running
    running.process.stop()


def _worker_state(server) -> tuple[float, float]:
    """(registry generation worker 0 last synced to, stacks it has built)."""
    generation, builds = -1.0, 0.0
    for family in text_string_to_metric_families(server.metrics_text()):
        for sample in family.samples:
            if sample.name == "conceptguard_registry_generation":
                generation = max(generation, sample.value)
            elif sample.name == "conceptguard_patch_stack_loads_total":
                builds += sample.value
    return generation, builds


def _assign(server, tenant: str, patch_ids: list[str]) -> int:
    response = server.admin("PUT", f"/v1/tenants/{tenant}", json={"patches": patch_ids})
    assert response.status_code == 200, response.text
    return response.json()["generation"]


def _upload(server, data: bytes) -> str:
    response = server.admin("POST", "/v1/patches", data=data)
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def test_an_idle_worker_is_woken_by_the_database(server, tiny_sd):
    patch_id = _upload(server, text_encoder_patch(tiny_sd, seed=11).to_bytes())
    _, builds_before = _worker_state(server)
    generation = _assign(server, "a", [patch_id])
    # No request is sent: only the notification can make the idle worker catch up and
    # build the new stack before its idle tick, an hour away.
    deadline = time.monotonic() + 15
    state = _worker_state(server)
    while state < (generation, builds_before + 1) and time.monotonic() < deadline:
        time.sleep(0.1)
        state = _worker_state(server)
    assert state[0] >= generation and state[1] >= builds_before + 1, state
    _, record = server.image("a")
    assert record["patches"] == [patch_id] and record["generation"] >= generation


def test_a_database_outage_under_load_fails_closed_and_heals(server, database, tiny_sd):
    stacks = {"b": [_upload(server, text_encoder_patch(tiny_sd, seed=12).to_bytes())], "c": []}
    for tenant, stack in stacks.items():
        _assign(server, tenant, stack)
    for tenant in stacks:  # both served before the outage
        assert server.image(tenant)[1]["patches"] == stacks[tenant]
    answers: list[tuple[str, float, int, list[str] | None]] = []
    stop = threading.Event()

    def client(tenant: str) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            response = server.generate(tenant, "a red circle", 1)
            body = response.json()
            record = body.get("conceptguard") if response.status_code == 200 else None
            answers.append((tenant, sent, response.status_code, record and record["patches"]))
            if response.status_code != 200:
                assert body["error"]["type"] == "RegistryUnavailable", body
                time.sleep(0.05)

    with ThreadPoolExecutor(max_workers=4) as pool:
        clients = [pool.submit(client, t) for t in ("b", "c", "b", "c")]
        time.sleep(3)
        database.stop()
        down_at = time.monotonic()
        time.sleep(OUTAGE_S)
        restarted_at = time.monotonic()  # it may accept before start() returns
        database.start()
        up_at = time.monotonic()
        deadline = up_at + 30
        while time.monotonic() < deadline:  # bounded: until both tenants are served again
            time.sleep(0.5)
            recent = [a for a in answers if a[1] > up_at and a[2] == 200]
            if {a[0] for a in recent} == set(stacks):
                break
        time.sleep(1)
        stop.set()
        for future in clients:
            future.result()

    wrong = [a for a in answers if a[2] == 200 and a[3] != stacks[a[0]]]
    assert not wrong, wrong
    # Sent while the database was down (after the batch that was running at the stop):
    # refused, every one, for every tenant.
    during = [a for a in answers if down_at + 1 < a[1] < restarted_at]
    assert {a[0] for a in during} == set(stacks)
    served = [(t, round(s - down_at, 2), c) for t, s, c, _ in during if c != 503]
    assert not served, (served, round(up_at - down_at, 2))
    # And it healed by itself: the last answers of both tenants are images again.
    for tenant in stacks:
        last = [a for a in answers if a[0] == tenant][-2:]
        assert [a[2] for a in last] == [200, 200], last
