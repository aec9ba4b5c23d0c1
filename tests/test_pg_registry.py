"""What only the PostgreSQL registry has, against a real server: no schema or no state row is
never an empty registry, an unreachable database fails closed and heals, the change feed and
its notifications, `registry migrate` both ways, and URLs that never show a password. (The
behaviour both backends share runs on both in test_registry*.py and test_runtime.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from conftest import run_conceptguard
from pg_server import fresh_dsn
from pg_server import own_server as start_own_server
from registry_backends import overwrite_blob, sql, stored
from server_process import free_port

from patches import pg_schema
from patches.errors import (
    RegistryCorrupt,
    RegistryExists,
    RegistryStateMissing,
    RegistryUnreadable,
)
from patches.local_registry import LocalRegistry
from patches.pg_registry import PostgresRegistry
from patches.registry import open_registry, shown_location
from server.errors import RegistryUnavailable
from server.runtime import PatchRuntime


@pytest.fixture
def pg_dsn() -> str:
    return fresh_dsn()


@pytest.fixture(scope="module")
def files(make_patch_bytes) -> list[bytes]:
    return [make_patch_bytes(i) for i in range(4)]


def _populated(registry, files):
    a, b = (registry.put_patch(data) for data in files[:2])
    registry.set_tenant("acme", [a.id, b.id])
    registry.set_tenant("acme", [b.id])
    registry.set_tenant("globex", [a.id])
    return a, b


def test_a_database_without_the_schema_is_no_registry(pg_dsn):
    with pytest.raises(RegistryStateMissing, match="no registry in this database"):
        open_registry(pg_dsn, create=False).snapshot()
    assert sql(PostgresRegistry(pg_dsn, create=False), "SELECT to_regclass('conceptguard.meta')")[
        0
    ] == (None,)
    registry = open_registry(pg_dsn)
    assert registry.generation() == 0 and registry.check() == []
    with pytest.raises(RegistryExists):
        registry.create()
    fresh = open_registry(fresh_dsn(), create=False)
    fresh.create()
    assert fresh.snapshot().generation == 0


def test_a_missing_state_row_is_an_error_and_recover_restores_it(pg_dsn, files):
    registry = open_registry(pg_dsn)
    _populated(registry, files)
    backup = registry.snapshot().to_json()
    generation = registry.generation()
    registry.set_tenant("acme", [])  # a change the backup does not have
    sql(registry, "DELETE FROM conceptguard.meta")
    before = stored(registry)

    reopened = open_registry(pg_dsn)  # opening creates nothing either
    for read in (reopened.snapshot, reopened.generation, reopened.list_tenants):
        with pytest.raises(RegistryStateMissing, match=r"state row .* is missing"):
            read()
    with pytest.raises(RegistryStateMissing, match="2 patch file"):
        reopened.set_tenant("acme", [])
    with pytest.raises(RegistryStateMissing):
        reopened.put_patch(files[2])
    with pytest.raises(RegistryStateMissing):
        reopened.create()
    assert stored(reopened) == before
    problems = reopened.check()
    assert len(problems) == 1 and "recover --from" in problems[0]

    state = reopened.recover(backup)
    # generation + 1 was issued after the backup: a worker may hold it, so it is skipped.
    assert state.generation == generation + 2
    assert reopened.get_tenant("acme").stack == tuple(
        json.loads(backup)["tenants"]["acme"]["stack"]
    )
    assert reopened.check() == []
    with pytest.raises(RegistryExists):
        reopened.recover(backup)


def test_the_change_feed_names_what_changed(pg_dsn, files, monkeypatch):
    registry = open_registry(pg_dsn)
    _, b = _populated(registry, files)
    start = registry.generation()
    registry.set_tenant("initech", [b.id])
    registry.delete_tenant("globex")
    c = registry.put_patch(files[2])
    changes = registry.changes_since(start)
    assert not changes.full and changes.generation == start + 3
    assert set(changes.tenants) == {"initech"} and changes.removed_tenants == {"globex"}
    assert set(changes.patches) == {c.id} and not changes.removed_patches
    assert registry.changes_since(changes.generation).empty
    # None, or a generation from another line (a restored backup is behind it): everything.
    for since in (None, changes.generation + 5):
        everything = registry.changes_since(since)
        assert everything.full and set(everything.tenants) == {"acme", "initech"}
    # A reader further behind than the feed keeps reads everything.
    monkeypatch.setattr(pg_schema, "FEED_KEEP", 4)
    monkeypatch.setattr(pg_schema, "FEED_PRUNE_EVERY", 2)
    for _ in range(6):
        registry.set_tenant("initech", [])
    assert registry.changes_since(start).full
    assert not registry.changes_since(registry.generation() - 1).full
    # The snapshot follows the feed and equals a whole read.
    assert registry.snapshot() == open_registry(pg_dsn).snapshot()


def test_the_local_change_feed_diffs_what_it_read(tmp_path, files):
    registry = LocalRegistry(tmp_path / "registry")
    _, b = _populated(registry, files)
    first = registry.changes_since(None)
    assert first.full and set(first.tenants) == {"acme", "globex"}
    registry.set_tenant("globex", [b.id])
    registry.delete_patch(registry.put_patch(files[3]).id)
    changes = registry.changes_since(first.generation)
    assert not changes.full and set(changes.tenants) == {"globex"}
    assert not changes.patches and not changes.removed_patches
    # Asked from a generation it did not answer with last: everything.
    assert registry.changes_since(first.generation).full


def test_a_write_notifies_waiting_readers(pg_dsn, files):
    registry = open_registry(pg_dsn)
    generation = registry.generation()
    woken: list[tuple[int | None, float]] = []

    def wait() -> None:
        started = time.monotonic()
        woken.append((registry.wait_for_change(generation, 30), time.monotonic() - started))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    open_registry(pg_dsn).set_tenant("acme", [])
    waiter.join(30)
    ((seen, waited),) = woken
    assert seen == generation + 1 and waited < 5
    assert registry.wait_for_change(seen, 0.2) is None


@pytest.fixture
def own_server():
    """A PostgreSQL server of this test's own, to stop and start again."""
    server = start_own_server()
    yield server
    server.remove()


def test_a_write_by_another_process_sets_the_change_signal(pg_dsn, files):
    reader = open_registry(pg_dsn)
    signal = reader.change_signal()
    assert reader.change_signal() is signal  # one listener per registry object
    listener = reader._listener
    assert listener.listening.wait(10)
    signal.clear()
    done = _cli(pg_dsn, "assign", "acme", "--create")
    assert done.returncode == 0, done.stderr
    assert signal.wait(10), "no notification reached the listener"
    signal.clear()
    assert not signal.wait(0.5)  # nothing else was written
    reader.close()
    assert not listener._thread.is_alive()


def test_an_unreachable_database_fails_every_tenant_closed_and_heals(own_server, tiny_sd, files):
    dsn = own_server.create_database("outage")
    registry = open_registry(dsn)
    a, b = _populated(registry, files)
    watched = open_registry(dsn, create=False)
    runtime = PatchRuntime(watched, tiny_sd)
    signal = watched.change_signal()
    assert watched._listener.listening.wait(10)
    before = runtime.refresh(wait=True)
    assert before.state_for("acme").stack == (b.id,)
    signal.clear()

    own_server.stop()
    # The listener's connection broke: the reader is woken to find the database gone.
    assert signal.wait(10) and not watched._listener.listening.is_set()
    started = time.monotonic()
    with pytest.raises(RegistryUnreadable) as info:
        registry.generation()
    assert time.monotonic() - started < 10
    assert str(own_server.port) not in str(info.value) and "127.0.0.1" not in str(info.value)
    down = runtime.refresh()
    for tenant in ("acme", "globex", "nobody"):
        with pytest.raises(RegistryUnavailable) as refused:
            down.state_for(tenant)
        assert refused.value.http_status == 503

    signal.clear()
    own_server.start()
    # It listens again by itself (backoff at most 5 s) and wakes the reader once more.
    assert watched._listener.listening.wait(15) and signal.wait(1)
    up = runtime.refresh(wait=True)
    assert up.registry_error is None
    assert up.state_for("acme").require_ready().stack == (b.id,)
    assert up.state_for("globex").require_ready().stack == (a.id,)
    registry.set_tenant("acme", [a.id])  # pooled connections died with the server: reopened
    assert runtime.refresh(wait=True).state_for("acme").stack == (a.id,)


def _cli(location: str, *args: str) -> subprocess.CompletedProcess:
    return run_conceptguard("registry", "--registry", location, *args)


def test_migrate_both_ways_verified_by_content_ids(tmp_path, files):
    source = LocalRegistry(tmp_path / "source")
    _populated(source, files)
    source.delete_patch(source.put_patch(files[2], name="gone").id)  # version 1 stays used
    expected = source.snapshot()
    dsn = fresh_dsn()

    there = run_conceptguard(
        "registry", "--json", "migrate", "--from", str(tmp_path / "source"), "--to", dsn
    )
    assert there.returncode == 0, there.stderr
    assert json.loads(there.stdout)["verified_files"] == 2
    database = open_registry(dsn, create=False)
    assert database.snapshot() == expected and database.check() == []
    assert database.put_patch(files[3], name="gone").version == 2  # never reused

    again = run_conceptguard("registry", "migrate", "--from", str(tmp_path / "source"), "--to", dsn)
    assert again.returncode == 2 and "RegistryExists" in again.stderr

    back = run_conceptguard("registry", "migrate", "--from", dsn, "--to", str(tmp_path / "back"))
    assert back.returncode == 0 and "verified by its content id" in back.stdout, back.stderr
    assert LocalRegistry(tmp_path / "back").snapshot() == database.snapshot()
    assert _cli(str(tmp_path / "back"), "check").returncode == 0


def test_a_damaged_source_migrates_nothing(tmp_path, files):
    dsn = fresh_dsn()
    source = open_registry(dsn)
    a, _ = _populated(source, files)
    overwrite_blob(source, a.id, files[3])
    target = open_registry(fresh_dsn())
    from patches.registry_cli import migrate

    with pytest.raises(RegistryCorrupt):
        migrate(source, target)
    assert target.generation() == 0 and target.list_patches() == []
    assert sql(target, "SELECT count(*) FROM conceptguard.blobs") == [(0,)]


def test_urls_never_show_passwords(tmp_path):
    for dsn in (
        "postgresql://cg:s3cret@db.example:5432/registry",
        "postgres://db.example/registry?user=cg&password=s3cret",
    ):
        shown = shown_location(dsn)
        assert "s3cret" not in shown and "db.example" in shown
    assert repr(PostgresRegistry("postgresql://cg:s3cret@127.0.0.1:1/x", create=False)) == (
        "PostgresRegistry('postgresql://cg@127.0.0.1:1/x')"
    )
    refused = _cli(f"postgresql://cg:s3cret@127.0.0.1:{free_port()}/x", "ls")
    assert refused.returncode == 2 and "RegistryUnreadable" in refused.stderr
    assert "s3cret" not in refused.stderr + refused.stdout


def test_a_local_registry_never_imports_psycopg(tmp_path):
    code = (
        "import sys; import server.app, patches.registry_cli, server.runtime\n"
        "from patches.registry import open_registry\n"
        f"open_registry({str(tmp_path / 'r')!r}).set_tenant('acme', [])\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("backend", ["postgresql", "local"])
def test_bench_registry_scale_times_a_refresh_after_one_assignment(backend, tmp_path):
    location = fresh_dsn() if backend == "postgresql" else str(tmp_path / "registry")
    out = tmp_path / "scale.json"
    # On the database, also registration -> served on two real servers sharing it.
    replicas = ["--replicas", "2", "--served-rounds", "2"] if backend == "postgresql" else []
    proc = run_conceptguard(
        "bench", "registry-scale", "--registry", location, "--tenants", "300", "--rounds", "4",
        *replicas, "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == backend and result["tenants"] == 300 and result["rounds"] == 4
    assert 0 < result["refresh_ms"]["p50"] <= result["refresh_ms"]["max"]
    if replicas:
        served = result["served"]
        assert served["replicas"] == 2 and served["rounds"] == 2 and served["stale_answers"] == 0
        assert (
            0
            < served["registration_to_served_ms"]["p50"]
            <= served["registration_to_served_ms"]["max"]
        )
    else:
        assert result["served"] is None
    assert "password" not in result["registry"]
    # The registry it filled is a real one: every tenant is there, one of them moved.
    registry = open_registry(location, create=False)
    tenants = registry.list_tenants()
    assert len(tenants) == 300 + bool(replicas)  # and the probe tenant
    assert len({t.stack for t in tenants if t.tenant != "probe"}) == 2
