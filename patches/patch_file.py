"""Reading untrusted patch files: every check happens before a tensor is built.

The safetensors header is parsed here with explicit bounds so that each malformed or hostile
input is refused with its own message; only a header that passed is handed to safetensors.
Pickles are never loaded.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from patches.errors import (
    BadTensorEntry,
    BadTensorNames,
    ContentHashMismatch,
    DuplicateTensorName,
    FileTooLarge,
    HeaderNotJSON,
    HeaderTooLarge,
    ManifestNotJSON,
    MissingManifest,
    NonFiniteValues,
    PickleRefused,
    TooManyTensors,
    TruncatedFile,
    UnsupportedDType,
)
from patches.manifest import METADATA_KEY, Manifest
from patches.targets import hash_named_tensors
from patches.untrusted_json import TooDeeplyNested, loads_untrusted

# Only floating dtypes a model is served in; anything else in a patch is refused.
ALLOWED_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,511}$")
_MAX_NDIM = 8
# A header is an object of objects holding lists of ints; a manifest's free-form `params`
# and `eval` get some room. Anything deeper is refused before pydantic sees it.
_HEADER_DEPTH = 4
MANIFEST_DEPTH = 32


@dataclass(frozen=True)
class FileLimits:
    """Bounds on anything read from outside. Defaults fit an SDXL-sized U-Net delta."""

    max_file_bytes: int = 8 * 2**30
    max_header_bytes: int = 8 * 2**20
    max_tensors: int = 16384
    max_manifest_bytes: int = 1 * 2**20


DEFAULT_LIMITS = FileLimits()


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ParsedHeader:
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _refuse_foreign_formats(head: bytes) -> None:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise PickleRefused(
            "this is a Python pickle (a .pt/.bin/.ckpt checkpoint); ConceptGuard never loads "
            "pickles because they can run code. Convert it to a safetensors patch."
        )
    if head.startswith(b"PK\x03\x04"):
        raise PickleRefused(
            "this is a zip archive (torch.save's format, which holds pickles); ConceptGuard "
            "accepts only safetensors patch files."
        )


def _json_object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateTensorName(f"the header names '{key}' twice; names must be unique")
        seen[key] = value
    return seen


def _parse_entry(name: str, raw: Any) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise BadTensorEntry(
            f"header entry '{name}' must be an object with exactly dtype, shape and data_offsets"
        )
    dtype = raw["dtype"]
    if dtype not in ALLOWED_DTYPES:
        raise UnsupportedDType(
            f"tensor '{name}' has dtype {dtype!r}; a patch may hold only "
            f"{', '.join(ALLOWED_DTYPES)} tensors"
        )
    shape = raw["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadTensorEntry(
            f"tensor '{name}' has shape {shape!r}; expected a list of at most {_MAX_NDIM} "
            "non-negative integers"
        )
    offsets = raw["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise BadTensorEntry(
            f"tensor '{name}' has data_offsets {offsets!r}; expected [begin, end] with "
            "0 <= begin <= end"
        )
    expected = math.prod(shape) * ALLOWED_DTYPES[dtype][1]
    if offsets[1] - offsets[0] != expected:
        raise BadTensorEntry(
            f"tensor '{name}' is {dtype} of shape {shape}, which takes {expected} bytes, but "
            f"its data_offsets span {offsets[1] - offsets[0]} bytes"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(data: bytes | memoryview, file_size: int, limits: FileLimits) -> ParsedHeader:
    """Check the framing, header JSON and tensor layout of a safetensors file."""
    if file_size > limits.max_file_bytes:
        raise FileTooLarge(
            f"the file is {_human(file_size)}; patches may be at most "
            f"{_human(limits.max_file_bytes)}"
        )
    head = bytes(data[:9])
    header_len = struct.unpack("<Q", head[:8])[0] if file_size >= 8 else 0
    # Safetensors framing is checked first: a header length such as 0x0280 starts with the
    # same two bytes as a pickle, and a real patch must never be mistaken for one.
    framed = file_size >= 9 and head[8:9] == b"{" and 8 + header_len <= file_size
    if not framed:
        _refuse_foreign_formats(head)
    if file_size < 8:
        raise TruncatedFile(
            f"the file is {file_size} bytes; a safetensors file starts with an 8-byte header length"
        )
    if header_len > limits.max_header_bytes:
        raise HeaderTooLarge(
            f"the header declares {header_len} bytes; at most {limits.max_header_bytes} "
            "are accepted"
        )
    if 8 + header_len > file_size:
        raise TruncatedFile(
            f"the header declares {header_len} bytes but only {file_size - 8} follow the "
            "length field: the file is truncated"
        )
    try:
        text = bytes(data[8 : 8 + header_len]).decode("utf-8")
        header = loads_untrusted(text, _HEADER_DEPTH, _json_object_without_duplicates)
    except TooDeeplyNested as exc:
        raise HeaderNotJSON(f"the safetensors header is not a header: {exc}") from None
    except ValueError as exc:  # UnicodeDecodeError and json.JSONDecodeError among them
        raise HeaderNotJSON(
            f"the safetensors header is not valid UTF-8 JSON ({exc}); is this a safetensors file?"
        ) from None
    if not isinstance(header, dict):
        raise HeaderNotJSON("the safetensors header must be a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise MissingManifest(
            "the file has no __metadata__, so no ConceptGuard manifest: a plain safetensors "
            "checkpoint is not a patch (make patches with `conceptguard erase`)"
        )
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MissingManifest("__metadata__ must map strings to strings")

    if len(header) > limits.max_tensors:
        raise TooManyTensors(
            f"the file holds {len(header)} tensors; at most {limits.max_tensors} are accepted"
        )
    if not header:
        raise BadTensorEntry("the file holds no tensors; a patch must carry at least one")
    for name in header:
        if not _TENSOR_NAME.match(name):
            raise BadTensorNames(
                f"tensor name {name[:80]!r} is not a module path (letters, digits, _ . - only, "
                "at most 512 characters)"
            )
    entries = {name: _parse_entry(name, raw) for name, raw in header.items()}

    data_start = 8 + header_len
    data_len = file_size - data_start
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            problem = "overlaps the previous one" if entry.begin < position else "leaves a gap"
            raise BadTensorEntry(
                f"tensor '{entry.name}' starts at byte {entry.begin} and {problem} (expected "
                f"{position}); tensors must be packed back to back"
            )
        position = entry.end
    if position > data_len:
        raise TruncatedFile(
            f"the tensors need {position} bytes of data but only {data_len} are present: "
            "the file is truncated"
        )
    if position < data_len:
        raise BadTensorEntry(
            f"{data_len - position} bytes follow the last tensor; a patch file has no trailing data"
        )
    return ParsedHeader(entries, metadata, data_start)


def parse_manifest(metadata: dict[str, str], limits: FileLimits) -> Manifest:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise MissingManifest(
            f"__metadata__ has no '{METADATA_KEY}' entry, so no ConceptGuard manifest "
            f"(keys present: {', '.join(sorted(metadata)) or 'none'})"
        )
    if len(raw) > limits.max_manifest_bytes:
        raise MissingManifest(
            f"the manifest is {len(raw)} bytes; at most {limits.max_manifest_bytes} are accepted"
        )
    try:
        decoded = loads_untrusted(raw, MANIFEST_DEPTH)
    except TooDeeplyNested as exc:
        raise ManifestNotJSON(f"the '{METADATA_KEY}' manifest is refused: {exc}") from None
    except ValueError as exc:
        raise ManifestNotJSON(f"the '{METADATA_KEY}' manifest is not JSON ({exc})") from None
    if not isinstance(decoded, dict):
        raise ManifestNotJSON(f"the '{METADATA_KEY}' manifest must be a JSON object")
    return Manifest.parse(decoded)


def non_finite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, infinite count) of `tensor`."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return 0, 0
    nan = int(torch.isnan(tensor).sum())
    return nan, int((~finite).sum()) - nan


def refuse_non_finite(name: str, nan: int, inf: int) -> None:
    if nan or inf:
        raise NonFiniteValues(
            f"tensor '{name}' holds {nan} NaN and {inf} infinite values; every value must be finite"
        )


def refuse_content_hash(actual: str, manifest: Manifest) -> None:
    if actual != manifest.content_sha256:
        raise ContentHashMismatch(
            f"the tensor data hashes to {actual[:12]}..., but the manifest says "
            f"{manifest.content_sha256[:12]}...: the file was corrupted or edited after it "
            "was made"
        )


def check_tensor_values(tensors: dict[str, torch.Tensor], manifest: Manifest) -> None:
    """Finite values, and data that matches the manifest's content hash."""
    for name, tensor in tensors.items():
        refuse_non_finite(name, *non_finite_counts(tensor))
    refuse_content_hash(hash_named_tensors(tensors.items(), None), manifest)


def decode_patch_bytes(
    data: bytes, limits: FileLimits = DEFAULT_LIMITS
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Validate an untrusted patch file held in memory and return its parts."""
    parsed = parse_header(data, len(data), limits)
    manifest = parse_manifest(parsed.metadata, limits)
    tensors = load_safetensors_bytes(data)
    check_tensor_values(tensors, manifest)
    return manifest, tensors
