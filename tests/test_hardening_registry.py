"""Issue 17, the registry's part: it never fails open and never silently re-initialises;
names are plain; identical bytes are answered honestly; files are checked from disk in
bounded memory. Real directories, real files, the real CLI in subprocesses."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import lora_patch, run_conceptguard, text_encoder_patch
from registry_backends import BACKENDS, new_registry, stored
from safetensors.torch import save as save_safetensors

from patches.errors import (
    HeaderNotJSON,
    InvalidName,
    ManifestNotJSON,
    PatchExists,
    RegistryCorrupt,
    RegistryExists,
    RegistryStateMissing,
    TenantNotFound,
)
from patches.local_registry import LocalRegistry
from patches.manifest import METADATA_KEY
from patches.patch import Patch
from patches.patch_file_stream import CHUNK_BYTES, check_patch_file
from patches.registry import open_registry
from patches.targets import hash_named_tensors


@pytest.fixture(scope="module")
def files(make_patch_bytes) -> list[bytes]:
    return [make_patch_bytes(i) for i in range(3)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def _files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _populated(root: Path, files: list[bytes]) -> LocalRegistry:
    """A registry that has existed: two patches, a tenant with a stack of both."""
    registry = LocalRegistry(root)
    a, b = (registry.put_patch(data) for data in files[:2])
    registry.set_tenant("acme", [a.id, b.id])
    return registry


def test_a_missing_state_is_an_error_and_writes_refuse_to_start_over(tmp_path, files):
    root = tmp_path / "registry"
    _populated(root, files)
    moved = tmp_path / "state-moved-away.json"
    shutil.move(root / "state.json", moved)
    before = _files_under(root)

    registry = LocalRegistry(root)  # reopening creates nothing either
    for read in (registry.snapshot, registry.generation, registry.list_tenants):
        with pytest.raises(RegistryStateMissing, match=r"state\.json is missing"):
            read()
    with pytest.raises(RegistryStateMissing, match="2 patch file"):
        registry.set_tenant("acme", [])
    with pytest.raises(RegistryStateMissing):
        registry.put_patch(files[2])
    with pytest.raises(RegistryStateMissing):
        registry.create()
    assert _files_under(root) == before
    problems = registry.check()
    assert len(problems) == 1 and "recover --from" in problems[0]
    assert str(root) not in problems[0]  # messages reach tenants: no server paths


def test_a_registry_without_patch_files_is_remembered_by_its_marker(tmp_path):
    root = tmp_path / "registry"
    LocalRegistry(root).set_tenant("acme", [])
    (root / "state.json").unlink()
    with pytest.raises(RegistryStateMissing, match=r"registry\.json marker"):
        LocalRegistry(root).snapshot()


def test_a_brand_new_registry_is_created_explicitly(tmp_path):
    with pytest.raises(RegistryStateMissing, match="no registry here"):
        open_registry(tmp_path / "nothing", create=False).snapshot()
    assert not (tmp_path / "nothing").exists()
    registry = open_registry(tmp_path / "new")
    assert registry.generation() == 0
    assert (tmp_path / "new" / "registry.json").is_file()
    with pytest.raises(RegistryExists):
        registry.create()
    fresh = open_registry(tmp_path / "explicit", create=False)
    fresh.create()
    assert fresh.snapshot().generation == 0


def test_recover_restores_a_copy_above_every_generation_issued(tmp_path, files):
    root = tmp_path / "registry"
    registry = _populated(root, files)
    backup = (root / "state.json").read_bytes()
    generation = registry.generation()
    registry.set_tenant("acme", [])  # a change the backup does not have
    (root / "state.json").unlink()

    broken = json.loads(backup)
    broken["patches"].popitem()
    with pytest.raises(RegistryCorrupt, match="cannot be restored"):
        registry.recover(json.dumps(broken).encode())
    state = registry.recover(backup)
    # generation + 1 was issued after the backup: a worker may hold it, so it is skipped.
    assert state.generation == generation + 2
    assert registry.get_tenant("acme").stack == tuple(
        json.loads(backup)["tenants"]["acme"]["stack"]
    )
    assert registry.check() == []
    with pytest.raises(RegistryExists):
        registry.recover(backup)


def test_assigning_a_tenant_with_no_record_must_be_asked_for(backend, tmp_path):
    registry = new_registry(backend, tmp_path)
    with pytest.raises(TenantNotFound, match="--create"):
        registry.set_tenant("acmee", [], create=False)
    registry.set_tenant("acme", [], create=True)
    assert registry.set_tenant("acme", [], create=False).tenant == "acme"


def _named(tiny_sd, name: str) -> bytes:
    patch = text_encoder_patch(tiny_sd, seed=3)
    manifest = patch.manifest.model_copy(update={"name": name})
    return Patch(manifest, patch.tensors).to_bytes()


def test_a_manifest_name_must_be_a_plain_name(backend, tmp_path, tiny_sd, files):
    registry = new_registry(backend, tmp_path)
    x = registry.put_patch(files[0], name="x")
    before = stored(registry)
    for hostile in ("../../x", "X", "x/../y", "a b"):
        with pytest.raises(InvalidName, match="not a plain patch name"):
            registry.put_patch(_named(tiny_sd, hostile))
    assert stored(registry) == before
    assert registry.list_patches() == [x]
    # An explicit name is the way to register such a file.
    assert registry.put_patch(_named(tiny_sd, "../../x"), name="y").ref == "y@1"


def test_identical_bytes_under_another_name_are_refused(backend, tmp_path, files):
    registry = new_registry(backend, tmp_path)
    record = registry.put_patch(files[0], name="circle")
    with pytest.raises(PatchExists, match=r"registered already as circle@1"):
        registry.put_patch(files[0], name="square")
    again = registry.put_patch_file(io.BytesIO(files[0]))
    assert (again.record, again.created) == (record, False)


def _with_raw_header(header_json: bytes) -> bytes:
    return struct.pack("<Q", len(header_json)) + header_json


def test_json_nesting_bombs_in_a_patch_file_are_refusals(tiny_sd, tmp_path):
    bomb = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(HeaderNotJSON, match="nested more than"):
        Patch.from_bytes(_with_raw_header(bomb))
    with pytest.raises(HeaderNotJSON, match="nested more than"):
        LocalRegistry(tmp_path / "registry").put_patch(_with_raw_header(bomb))
    manifest = text_encoder_patch(tiny_sd).manifest.to_json()
    assert '"params":{}' in manifest
    for depth in (100_000, 40):  # too deep for json itself; parses, but past the bound
        nested = '"params":{"y":' + "[" * depth + "]" * depth + "}"
        text = manifest.replace('"params":{}', nested)
        data = save_safetensors({"w": torch.zeros(2)}, metadata={METADATA_KEY: text})
        with pytest.raises(ManifestNotJSON, match="nested more than 32 levels"):
            Patch.from_bytes(data)
        with pytest.raises(ManifestNotJSON, match="nested more than 32 levels"):
            LocalRegistry(tmp_path / f"registry-{depth}").put_patch(data)


def test_a_file_checked_from_disk_agrees_with_loading_it(tiny_sd, tmp_path):
    for patch in (text_encoder_patch(tiny_sd, seed=8), lora_patch(tiny_sd, seed=9)):
        path = tmp_path / "p.safetensors"
        patch.save(path)
        with open(path, "rb") as file:
            checked = check_patch_file(file)
        assert checked.sha256 == patch.id and checked.size == path.stat().st_size
        assert checked.manifest == patch.manifest
        shapes = {n: tuple(t.shape) for n, t in checked.meta_tensors().items()}
        assert shapes == {n: tuple(t.shape) for n, t in patch.tensors.items()}


def test_a_large_file_is_checked_and_stored_in_bounded_memory(backend, tiny_sd, tmp_path):
    # 96 MiB in two dtypes stored out of name order, so both hashing passes run.
    tensors = {
        "a.weight": torch.zeros(8 * 2**20, dtype=torch.float16),
        "b.weight": torch.zeros(20 * 2**20, dtype=torch.float32),
    }
    manifest = text_encoder_patch(tiny_sd).manifest.model_copy(
        update={"content_sha256": hash_named_tensors(tensors.items(), None), "name": "big"}
    )
    path = tmp_path / "big.safetensors"
    path.write_bytes(save_safetensors(tensors, metadata={METADATA_KEY: manifest.to_json()}))
    del tensors
    registry = new_registry(backend, tmp_path)
    tracemalloc.start()
    with open(path, "rb") as file:
        registered = registry.put_patch_file(file)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert registered.created and registered.record.size == path.stat().st_size
    assert peak < 1.5 * CHUNK_BYTES, f"peak {peak / 2**20:.1f} MiB while storing 96 MiB"
    assert registry.check() == []


def _cli(registry_dir: Path, *args: str):
    return run_conceptguard("registry", "--dir", str(registry_dir), *args)


def test_cli_check_reports_a_missing_state_and_recover_restores_it(tmp_path, files):
    root = tmp_path / "registry"
    _populated(root, files)
    moved = tmp_path / "moved.json"
    shutil.move(root / "state.json", moved)
    check = _cli(root, "check")
    assert check.returncode == 1 and "state.json is missing" in check.stdout
    refused = _cli(root, "assign", "acme")
    assert refused.returncode == 2 and "RegistryStateMissing" in refused.stderr
    assert not (root / "state.json").exists()
    listing = _cli(tmp_path / "no-such-registry", "ls")
    assert listing.returncode == 2 and "no registry here" in listing.stderr
    assert not (tmp_path / "no-such-registry").exists()

    recovered = _cli(root, "recover", "--from", str(moved))
    assert recovered.returncode == 0 and "generation 4" in recovered.stdout, recovered.stderr
    typo = _cli(root, "assign", "acmee")
    assert typo.returncode == 2 and "--create" in typo.stderr
    assert _cli(tmp_path / "fresh", "init").returncode == 0
