"""The patch registry: records, references, tenants, rollback, refusals and its CLI, on
every backend (a local directory, a real PostgreSQL database)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_conceptguard
from registry_backends import (
    BACKENDS,
    blob_ids,
    location,
    new_registry,
    overwrite_blob,
    remove_blob,
    stored,
)

from patches.errors import (
    AmbiguousReference,
    BaseFingerprintMismatch,
    InvalidName,
    NothingToRollBack,
    PatchExists,
    PatchFileError,
    PatchInUse,
    PatchNotFound,
    RegistryCorrupt,
    RegistryError,
    TenantNotFound,
)
from patches.local_registry import RACY_NS, LocalRegistry
from patches.registry import HISTORY_LIMIT, PatchRecord, Registry, open_registry, resolve_ref


@pytest.fixture(scope="module")
def files(make_patch_bytes) -> list[bytes]:
    # Made once: a patch's bytes include its creation time.
    return [make_patch_bytes(i) for i in range(6)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def registry(backend, tmp_path) -> Registry:
    return new_registry(backend, tmp_path)


def test_put_get_list_and_resolve(registry, files):
    records = [registry.put_patch(data) for data in files[:3]]
    assert [r.id for r in records] == [hashlib.sha256(d).hexdigest() for d in files[:3]]
    first = records[0]
    assert (first.name, first.version, first.size) == ("test-concept0", 1, len(files[0]))
    assert (first.kind, first.method, first.concepts, first.target) == (
        "text_encoder",
        "test",
        ["concept0"],
        "text_encoder",
    )
    assert registry.list_patches() == sorted(records, key=lambda r: r.name)
    assert registry.get_patch_bytes(first.id) == files[0]
    assert registry.load_patch("test-concept1").id == records[1].id
    for ref in (first.id, first.id[:8], first.id[:20].upper(), "test-concept0@1", "test-concept0"):
        assert registry.resolve(ref) == first.id
    assert registry.patch_record(first.id[:10]) == first
    assert json.loads(json.dumps(first.to_dict()))["concepts"] == ["concept0"]


def test_versions_count_per_name_and_a_bare_name_is_the_latest(registry, files):
    records = [registry.put_patch(data, name="circle") for data in files[:3]]
    other = registry.put_patch(files[3], name="square")
    assert [r.version for r in records] == [1, 2, 3]
    assert other.version == 1
    assert registry.resolve("circle") == records[2].id
    assert registry.resolve("circle@2") == records[1].id
    with pytest.raises(PatchNotFound, match=r"known versions: \[1, 2, 3\]"):
        registry.resolve("circle@4")


def test_a_deleted_version_number_is_never_reused(registry, files):
    first = registry.put_patch(files[0], name="circle")
    second = registry.put_patch(files[1], name="circle")
    registry.delete_patch(second.id)
    third = registry.put_patch(files[2], name="circle")
    assert (first.version, second.version, third.version) == (1, 2, 3)
    with pytest.raises(PatchNotFound, match="known versions: \\[1, 3\\]"):
        registry.resolve("circle@2")
    assert registry.resolve("circle") == third.id
    assert registry.check() == []


def test_re_putting_identical_bytes_is_idempotent_and_honest(registry, files):
    record = registry.put_patch(files[0])
    generation = registry.generation()
    again = registry.put_patch_file(io.BytesIO(files[0]))
    assert (again.record, again.created) == (record, False)
    assert registry.put_patch(files[0], name=record.name) == record
    # Another name for the same bytes is refused, naming the one they have.
    with pytest.raises(PatchExists, match="registered already as test-concept0@1"):
        registry.put_patch(files[0], name="another-name")
    assert registry.generation() == generation
    assert len(registry.list_patches()) == 1


def test_unknown_and_ambiguous_references_say_what_was_expected(registry, files):
    registry.put_patch(files[0])
    with pytest.raises(PatchNotFound, match="NAME@VERSION"):
        registry.resolve("nope")
    with pytest.raises(PatchNotFound, match="at least 8 hex digits"):
        registry.resolve(registry.list_patches()[0].id[:6])
    with pytest.raises(PatchNotFound, match="part after '@' must be a version"):
        registry.resolve("test-concept0@latest")
    # Two ids sharing 8 hex digits are too rare to make from real files: use records.
    fake = {
        pid: PatchRecord(pid, "x", 1, 1, "text_encoder", "m", ["c"], "text_encoder", "", "")
        for pid in ("abcdef01" + "0" * 56, "abcdef01" + "1" * 56)
    }
    with pytest.raises(AmbiguousReference, match="prefix of 2 patch ids"):
        resolve_ref(fake, "abcdef01")
    assert resolve_ref(fake, "abcdef011") == "abcdef01" + "1" * 56


def test_delete_is_refused_while_a_tenant_uses_the_patch(registry, files):
    record = registry.put_patch(files[0])
    registry.set_tenant("acme", [record.id])
    registry.set_tenant("globex", [record.id])
    with pytest.raises(PatchInUse, match="acme, globex"):
        registry.delete_patch(record.ref)
    registry.set_tenant("acme", [])
    registry.delete_tenant("globex")
    generation = registry.generation()
    assert registry.delete_patch(record.ref) == record
    assert registry.generation() == generation + 1
    assert registry.list_patches() == []
    assert blob_ids(registry) == set()
    with pytest.raises(PatchNotFound):
        registry.delete_patch(record.id)
    assert registry.check() == []


def test_tenants_set_get_list_delete(registry, files):
    a, b = (registry.put_patch(data) for data in files[:2])
    record = registry.set_tenant("acme", [a.ref, b.id[:8]])
    assert record.stack == (a.id, b.id)
    assert record.generation == registry.generation()
    assert [(e.action, e.stack) for e in record.history] == [("assign", (a.id, b.id))]
    assert registry.get_tenant("acme") == record
    assert registry.set_tenant("base-only", []).stack == ()
    assert [t.tenant for t in registry.list_tenants()] == ["acme", "base-only"]
    # The same stack again is recorded, but the tenant's stack did not change.
    again = registry.set_tenant("acme", [a.id, b.id])
    assert (again.generation, len(again.history)) == (record.generation, 2)
    registry.delete_tenant("base-only")
    with pytest.raises(TenantNotFound, match="known tenants: acme"):
        registry.get_tenant("base-only")
    with pytest.raises(TenantNotFound):
        registry.delete_tenant("base-only")
    json.dumps(again.to_dict())


def test_bad_stacks_are_refused_and_write_nothing(registry, files):
    a = registry.put_patch(files[0])
    before = stored(registry)
    with pytest.raises(InvalidName, match="twice"):
        registry.set_tenant("acme", [a.id, a.ref])
    with pytest.raises(PatchNotFound):
        registry.set_tenant("acme", [a.id, "missing"])
    with pytest.raises(TypeError):
        registry.set_tenant("acme", a.id)
    assert stored(registry) == before


@pytest.mark.parametrize(
    "name", ["", "Acme", "-acme", "_a", "a" * 64, "a b", "a/b", "é", "a.b", "acme\n"]
)
def test_invalid_tenant_names_are_refused_with_the_rule(registry, name):
    with pytest.raises(InvalidName, match="1-63 characters of a-z, 0-9"):
        registry.set_tenant(name, [])
    assert registry.generation() == 0


def test_valid_tenant_names(registry):
    for name in ("a", "0", "a" * 63, "team_1-prod"):
        registry.set_tenant(name, [])
    assert len(registry.list_tenants()) == 4


def test_rollback_default_toggles_and_to_generation(registry, files):
    a, b, c = (registry.put_patch(data) for data in files[:3])
    first = registry.set_tenant("acme", [a.id]).history[-1].generation
    registry.set_tenant("acme", [a.id, b.id])
    registry.set_tenant("acme", [a.id, b.id])  # the same stack again: not a change
    registry.set_tenant("acme", [c.id])
    back = registry.rollback_tenant("acme")
    assert back.stack == (a.id, b.id)
    assert (back.history[-1].action, back.generation) == ("rollback", registry.generation())
    assert registry.rollback_tenant("acme").stack == (c.id,)
    assert registry.rollback_tenant("acme", to_generation=first).stack == (a.id,)
    assert len(registry.get_tenant("acme").history) == 7


def test_rollback_refusals(registry, files):
    a, b = (registry.put_patch(data) for data in files[:2])
    registry.set_tenant("acme", [a.id])
    with pytest.raises(NothingToRollBack, match="no earlier stack"):
        registry.rollback_tenant("acme")
    with pytest.raises(NothingToRollBack, match="no history entry at generation 999"):
        registry.rollback_tenant("acme", to_generation=999)
    with pytest.raises(TenantNotFound):
        registry.rollback_tenant("nobody")
    registry.set_tenant("acme", [b.id])
    registry.delete_patch(a.id)
    generation = registry.generation()
    with pytest.raises(PatchNotFound, match="deleted patch"):
        registry.rollback_tenant("acme")
    assert registry.generation() == generation
    registry.put_patch(files[0])  # registered again: the old stack is whole again
    assert registry.rollback_tenant("acme").stack == (a.id,)


def test_history_keeps_the_last_entries(registry):
    for _ in range(HISTORY_LIMIT + 5):
        record = registry.set_tenant("acme", [])
    assert len(record.history) == HISTORY_LIMIT
    assert record.history[-1].generation == registry.generation() == HISTORY_LIMIT + 5


def test_every_write_adds_exactly_one_generation(registry, files):
    steps = [
        lambda: registry.put_patch(files[0]),
        lambda: registry.put_patch(files[1], name="b"),
        lambda: registry.set_tenant("acme", ["b"]),
        lambda: registry.set_tenant("acme", ["b"]),
        lambda: registry.set_tenant("acme", ["test-concept0"]),
        lambda: registry.rollback_tenant("acme"),
        lambda: registry.set_tenant("other", []),
        lambda: registry.delete_tenant("other"),
        lambda: registry.set_tenant("acme", []),
        lambda: registry.delete_patch("b"),
    ]
    for expected, step in enumerate(steps, start=1):
        step()
        assert registry.generation() == expected


def test_a_refused_upload_writes_nothing(registry, files):
    registry.put_patch(files[0])
    before, generation = stored(registry), registry.generation()

    def wrong_base(patch) -> None:
        raise BaseFingerprintMismatch("not this server's model")

    refusals = [
        (files[1][:-10], {}, PatchFileError),
        (b"\x00" * 64, {}, PatchFileError),
        (files[1][:8] + b"{not json" + files[1][17:], {}, PatchFileError),
        (files[1], {"name": "Bad Name"}, InvalidName),
        (files[1], {"name": "deadbeef12"}, InvalidName),
        (files[1], {"check": wrong_base}, BaseFingerprintMismatch),
    ]
    for data, kwargs, error in refusals:
        with pytest.raises(error):
            registry.put_patch(data, **kwargs)
    assert stored(registry) == before
    assert registry.generation() == generation


def test_default_names_are_sanitised(registry, files):
    # What `put` falls back to when the manifest has no name: "{method}-{concepts}".
    assert registry.put_patch(files[0]).name == "test-concept0"


def test_a_damaged_store_is_reported_not_served(registry, files):
    record = registry.put_patch(files[0])
    registry.put_patch(files[1])
    overwrite_blob(registry, record.id, files[1])
    with pytest.raises(RegistryCorrupt, match="not its id"):
        registry.load_patch(record.id)
    assert any("does not match its id" in p for p in registry.check())
    remove_blob(registry, record.id)
    with pytest.raises(RegistryCorrupt, match="missing"):
        registry.get_patch_bytes(record.id)
    assert any("missing" in p for p in registry.check())
    if not isinstance(registry, LocalRegistry):
        return
    (registry.root / "state.json").write_text('{"format": 1, "generation": "x"')
    with pytest.raises(RegistryCorrupt, match=r"state\.json"):
        registry.list_patches()
    assert len(registry.check()) == 1


def test_leftovers_of_a_crashed_writer_are_harmless(tmp_path, files):
    registry = LocalRegistry(tmp_path / "registry")
    record = registry.put_patch(files[0])
    orphan = registry.put_patch(files[1])
    registry.delete_patch(orphan.id)
    (registry.root / "blobs" / f"{orphan.id}.safetensors").write_bytes(files[1])
    (registry.root / "tmp" / ".state.json.x.tmp").write_bytes(b"{half")
    assert registry.check() == []
    assert registry.list_patches() == [record]
    registry.set_tenant("acme", [])  # the next writer clears temp files
    assert list((registry.root / "tmp").iterdir()) == []
    assert registry.put_patch(files[1]).id == orphan.id


def test_generation_sees_every_write_of_another_process_view(backend, tmp_path, files):
    where = location(backend, tmp_path)
    writer, reader = open_registry(where), open_registry(where)
    assert reader.generation() == 0
    for expected in range(1, 41):
        # Same size, rapid writes: the stat key alone could repeat within one mtime tick.
        writer.set_tenant("acme", [])
        assert reader.generation() == expected


def test_generation_is_cheap(tmp_path, files):
    registry = LocalRegistry(tmp_path / "r")
    registry.put_patch(files[0])
    # A state file written moments ago is re-read on every call (see RACY_NS); age it.
    state, long_ago = tmp_path / "r" / "state.json", time.time_ns() - 10 * RACY_NS
    os.utime(state, ns=(long_ago, long_ago))
    calls = 20000
    start = time.perf_counter()
    for _ in range(calls):
        registry.generation()
    per_call = (time.perf_counter() - start) / calls
    print(f"\ngeneration(): {per_call * 1e6:.1f} us per call")
    assert per_call < 50e-6


def test_open_registry(tmp_path):
    assert isinstance(open_registry(str(tmp_path / "new" / "dir")), LocalRegistry)
    assert (tmp_path / "new" / "dir" / "blobs").is_dir()
    with pytest.raises(RegistryError, match="s3:// registries are not supported"):
        open_registry("s3://bucket/prefix")


# --- the CLI, through real processes ------------------------------------------------------


def _cli(registry_dir: Path | str, *args: str) -> subprocess.CompletedProcess:
    return run_conceptguard("registry", "--dir", str(registry_dir), *args)


def _refused(result: subprocess.CompletedProcess, error: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and error in result.stderr, result.stderr


def test_cli_round_trip(backend, tmp_path, files):
    registry_dir = location(backend, tmp_path)
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    good.write_bytes(files[0])
    bad.write_bytes(files[0][:-3])

    put = _cli(registry_dir, "--json", "put", str(good), "--name", "circle")
    assert put.returncode == 0, put.stderr
    record = json.loads(put.stdout)
    assert (record["name"], record["version"], record["generation"]) == ("circle", 1, 1)

    _refused(_cli(registry_dir, "put", str(bad)), "TruncatedFile")
    _refused(_cli(registry_dir, "put", str(tmp_path / "missing.safetensors")), "missing")

    _refused(_cli(registry_dir, "assign", "acme", "circle"), "--create")
    assign = _cli(registry_dir, "assign", "acme", "circle", "--create")
    assert assign.returncode == 0 and "circle@1" in assign.stdout, assign.stderr
    _refused(_cli(registry_dir, "rm", "circle"), "PatchInUse")
    _refused(_cli(registry_dir, "rollback", "acme"), "NothingToRollBack")

    listing = _cli(registry_dir, "--json", "ls")
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    assert data["generation"] == 2
    assert [p["id"] for p in data["patches"]] == [record["id"]]
    assert data["tenants"][0]["stack"] == [record["id"]]

    human = _cli(registry_dir, "ls")
    assert human.returncode == 0 and "circle@1" in human.stdout and "acme" in human.stdout

    check = _cli(registry_dir, "check")
    assert (check.returncode, check.stdout.split(":")[0]) == (0, "ok")
    overwrite_blob(open_registry(registry_dir, create=False), record["id"], files[1])
    check = _cli(registry_dir, "check")
    assert check.returncode == 1 and "does not match its id" in check.stdout
