"""Malformed and hostile patch files: each is refused with its own message, nothing is stored.

Every case is a real file on disk, refused three ways: `Patch.load`, a registry upload
(with the server-side check against the served pipeline) and the CLI in a subprocess.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import lora_patch, run_conceptguard, text_encoder_patch
from safetensors.torch import save as save_safetensors

from patches import errors
from patches.manifest import METADATA_KEY
from patches.patch import Patch
from patches.patch_file import FileLimits
from patches.registry import open_registry

SMALL_LIMITS = FileLimits(max_file_bytes=64 * 2**10, max_header_bytes=16 * 2**10, max_tensors=8)


def _raw(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_manifest(valid: bytes, edit: Callable[[dict], None]) -> bytes:
    header, body = _split(valid)
    manifest = json.loads(header["__metadata__"][METADATA_KEY])
    edit(manifest)
    header["__metadata__"][METADATA_KEY] = json.dumps(manifest)
    return _raw(header, body)


def _resave(patch: Patch, tensors: dict[str, torch.Tensor], **manifest_edits) -> bytes:
    """Tensors changed after the fact but with a correct content hash (passes file checks)."""
    from patches.targets import hash_named_tensors

    manifest = patch.manifest.model_copy(
        update={"content_sha256": hash_named_tensors(tensors.items(), None), **manifest_edits}
    )
    return save_safetensors(tensors, metadata={METADATA_KEY: manifest.to_json()})


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


@dataclass
class Case:
    name: str
    make: Callable[[Patch, Patch], bytes]  # (text-encoder patch, lora patch) -> file bytes
    error: type[errors.ConceptGuardError]
    phrase: str
    limits: FileLimits | None = None


def _first(patch: Patch) -> str:
    return sorted(patch.tensors)[0]


CASES = [
    Case("empty", lambda p, q: b"", errors.TruncatedFile, "8-byte header length"),
    Case(
        "truncated-data",
        lambda p, q: p.to_bytes()[:-100],
        errors.TruncatedFile,
        "the tensors need",
    ),
    Case(
        "truncated-header",
        lambda p, q: p.to_bytes()[:200],
        errors.TruncatedFile,
        "follow the length field",
    ),
    Case(
        "oversized-header",
        lambda p, q: struct.pack("<Q", 2**40) + b"{}",
        errors.HeaderTooLarge,
        "header declares",
    ),
    Case(
        "pickle",
        lambda p, q: pickle.dumps({"w": [1.0, 2.0]}),
        errors.PickleRefused,
        "never loads pickles",
    ),
    Case("torch-zip", lambda p, q: _torch_zip(), errors.PickleRefused, "zip archive"),
    Case(
        "header-not-json",
        lambda p, q: struct.pack("<Q", 9) + b"{not json",
        errors.HeaderNotJSON,
        "not valid UTF-8 JSON",
    ),
    Case(
        "header-is-a-list",
        lambda p, q: _raw([1, 2], b""),  # type: ignore[arg-type]
        errors.HeaderNotJSON,
        "must be a JSON object",
    ),
    Case(
        "header-nesting-bomb",
        lambda p, q: struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
        errors.HeaderNotJSON,
        "nested more than 4 levels",
    ),
    Case(
        "manifest-nesting-bomb",
        lambda p, q: _with_manifest(
            p.to_bytes(), lambda m: m.update(params={"x": json.loads("[" * 900 + "]" * 900)})
        ),
        errors.ManifestNotJSON,
        "nested more than 32 levels",
    ),
    Case(
        "plain-checkpoint",
        lambda p, q: save_safetensors({"w": torch.zeros(2)}),
        errors.MissingManifest,
        "no __metadata__",
    ),
    Case(
        "metadata-without-manifest",
        lambda p, q: save_safetensors({"w": torch.zeros(2)}, metadata={"format": "pt"}),
        errors.MissingManifest,
        "no 'conceptguard' entry",
    ),
    Case(
        "manifest-not-json",
        lambda p, q: save_safetensors({"w": torch.zeros(2)}, metadata={METADATA_KEY: "{oops"}),
        errors.ManifestNotJSON,
        "manifest is not JSON",
    ),
    Case(
        "manifest-missing-fields",
        lambda p, q: _with_manifest(p.to_bytes(), lambda m: [m.pop("kind"), m.pop("target")]),
        errors.InvalidManifest,
        "missing field 'kind'",
    ),
    Case(
        "unknown-format-version",
        lambda p, q: _with_manifest(p.to_bytes(), lambda m: m.update(format_version=99)),
        errors.InvalidManifest,
        "format_version 99 is not supported",
    ),
    Case(
        "wrong-kind-for-target",
        lambda p, q: _with_manifest(
            p.to_bytes(), lambda m: m.update(kind="unet_weights", mode="delta")
        ),
        errors.InvalidManifest,
        "cannot target 'text_encoder'",
    ),
    Case(
        "nan-values",
        lambda p, q: _resave(p, {**p.tensors, _first(p): p.tensors[_first(p)] * float("nan")}),
        errors.NonFiniteValues,
        "NaN",
    ),
    Case(
        "inf-values",
        lambda p, q: _resave(
            p, {**p.tensors, _first(p): torch.full_like(p.tensors[_first(p)], float("inf"))}
        ),
        errors.NonFiniteValues,
        "infinite values",
    ),
    Case(
        "integer-dtype",
        lambda p, q: _resave(p, {**p.tensors, _first(p): torch.zeros(3, dtype=torch.int64)}),
        errors.UnsupportedDType,
        "dtype 'I64'",
    ),
    Case(
        "float64-dtype",
        lambda p, q: _resave(p, {k: v.double() for k, v in p.tensors.items()}),
        errors.UnsupportedDType,
        "dtype 'F64'",
    ),
    Case(
        "edited-after-signing",
        lambda p, q: p.to_bytes()[:-4] + b"\x00\x00\x80\x3f",
        errors.ContentHashMismatch,
        "corrupted or edited",
    ),
    Case(
        "overlapping-tensors",
        lambda p, q: _overlap(p),
        errors.BadTensorEntry,
        "overlaps the previous one",
    ),
    Case(
        "trailing-bytes",
        lambda p, q: p.to_bytes() + b"\x00" * 16,
        errors.BadTensorEntry,
        "follow the last tensor",
    ),
    Case(
        "shape-offset-mismatch",
        lambda p, q: _shape_lie(p),
        errors.BadTensorEntry,
        "its data_offsets span",
    ),
    Case(
        "duplicate-names",
        lambda p, q: _duplicate_name(p),
        errors.DuplicateTensorName,
        "names must be unique",
    ),
    Case(
        "path-traversal-name",
        lambda p, q: _resave(p, {"../../etc/passwd": torch.zeros(2)}),
        errors.BadTensorNames,
        "is not a module path",
    ),
    Case(
        "lora-missing-B",
        lambda p, q: _resave(q, {k: v for k, v in q.tensors.items() if "lora_B" not in k}),
        errors.BadTensorNames,
        "LoRA comes in pairs",
    ),
    Case(
        "too-many-tensors",
        lambda p, q: save_safetensors(
            {f"t{i}": torch.zeros(1) for i in range(9)}, metadata={METADATA_KEY: "{}"}
        ),
        errors.TooManyTensors,
        "at most 8 are accepted",
        SMALL_LIMITS,
    ),
    Case(
        "file-too-large",
        lambda p, q: save_safetensors({"w": torch.zeros(20000)}, metadata={METADATA_KEY: "{}"}),
        errors.FileTooLarge,
        "patches may be at most",
        SMALL_LIMITS,
    ),
    # Well-formed files that do not fit the served pipeline (refused by the upload check).
    Case(
        "unknown-tensor-names",
        lambda p, q: _resave(
            p, {n.replace("layers.0", "layers.9"): t for n, t in p.tensors.items()}
        ),
        errors.UnknownTensorName,
        "does not have",
    ),
    Case(
        "wrong-shape",
        lambda p, q: _resave(p, {**p.tensors, _first(p): torch.zeros(3, 3)}),
        errors.ShapeMismatch,
        "has shape [3, 3]",
    ),
    Case(
        "made-for-another-base",
        lambda p, q: _resave(p, p.tensors, base_fingerprint={"float32": "ab" * 32}),
        errors.BaseFingerprintMismatch,
        "exact model it was made for",
    ),
    Case(
        "component-missing-on-pipeline",
        lambda p, q: _with_manifest(
            _resave(p, p.tensors),
            lambda m: m["target"].update(component="text_encoder_2"),
        ),
        errors.WrongTarget,
        "has only: text_encoder, unet",
    ),
]


def _overlap(p: Patch) -> bytes:
    header, body = _split(p.to_bytes())
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    b = names[1]
    size_b = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [0, size_b]
    return _raw(header, body)


def _shape_lie(p: Patch) -> bytes:
    header, body = _split(p.to_bytes())
    name = _first(p)
    header[name]["shape"] = [*header[name]["shape"], 2]
    return _raw(header, body)


def _duplicate_name(p: Patch) -> bytes:
    header, body = _split(p.to_bytes())
    encoded = json.dumps(header)
    name = _first(p)
    entry = json.dumps({name: header[name]})[1:-1]
    duplicated = encoded[:-1] + ", " + entry + "}"
    raw = duplicated.encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.fixture(scope="module")
def hostile_files(tiny_sd, tmp_path_factory):
    te, lora = text_encoder_patch(tiny_sd, seed=5), lora_patch(tiny_sd, seed=6)
    folder = tmp_path_factory.mktemp("hostile")
    files = {}
    for case in CASES:
        path = folder / f"{case.name}.safetensors"
        path.write_bytes(case.make(te, lora))
        files[case.name] = path
    return files


def _refusal(case: Case, path, pipe) -> errors.ConceptGuardError:
    with pytest.raises(errors.ConceptGuardError) as caught:
        patch = Patch.load(path, case.limits or FileLimits())
        patch.verify(pipe)
    return caught.value


def test_a_header_length_that_looks_like_pickle_magic_is_still_a_patch(tiny_sd):
    # Headers of 640, 896, 1152 or 1408 bytes are stored as 80 02..05 00 ...: the first bytes
    # of a pickle. A real patch with such a header must still load.
    full = text_encoder_patch(tiny_sd, seed=9)
    name = sorted(full.tensors)[0]
    patch = Patch.create(
        pipe=tiny_sd,
        kind="text_encoder",
        component="text_encoder",
        method="test",
        concepts=["pickle-lookalike"],
        tensors={name: full.tensors[name]},
    )
    for pad in range(1, 1200):
        candidate = patch.manifest.model_copy(update={"params": {"pad": "x" * pad}})
        data = save_safetensors(patch.tensors, metadata={METADATA_KEY: candidate.to_json()})
        if data[0] == 0x80 and 2 <= data[1] <= 5:
            break
    else:
        pytest.fail("no padding gave a header length that starts like a pickle")
    assert Patch.from_bytes(data).manifest.params == candidate.params


def test_at_least_fifteen_distinct_refusals():
    assert len({c.name for c in CASES}) >= 15
    assert len({c.error for c in CASES}) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_file_is_refused_with_its_own_message(case, hostile_files, tiny_sd):
    error = _refusal(case, hostile_files[case.name], tiny_sd)
    assert type(error) is case.error, f"{case.name}: got {type(error).__name__}: {error}"
    assert case.phrase in str(error)


def test_messages_are_all_different(hostile_files, tiny_sd):
    messages = [str(_refusal(c, hostile_files[c.name], tiny_sd)) for c in CASES]
    assert len(set(messages)) == len(messages)


def test_registry_stores_nothing_refused(hostile_files, tiny_sd, tmp_path):
    registry = open_registry(str(tmp_path / "registry"))
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for case in CASES:
        if case.limits is not None:
            continue  # limits are a property of the reader, covered above
        with pytest.raises(case.error):
            registry.put_patch(
                hostile_files[case.name].read_bytes(), check=lambda p: p.verify(tiny_sd)
            )
    assert registry.list_patches() == []
    assert registry.generation() == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == [
        f for f in files_before if (tmp_path / f).is_file()
    ]


@pytest.mark.parametrize("name", ["pickle", "nan-values", "truncated-data", "manifest-not-json"])
def test_cli_refuses_with_one_line_and_no_traceback(name, hostile_files):
    result = run_conceptguard("patch", "inspect", str(hostile_files[name]))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("conceptguard:")]
    assert len(lines) == 1, result.stderr
