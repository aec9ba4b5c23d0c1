"""Checking an untrusted patch file from disk in bounded memory (uploads of up to gigabytes).

The same checks as `decode_patch_bytes`, in the same order, but the tensor data is read in
chunks and never held whole: the header is parsed by `parse_header`, then one pass over the
data in file order computes the file's sha256 (its id) and refuses NaN/inf values, and the
manifest's content hash is computed over the tensors in name order (in that same pass when
the file stores them in name order, as safetensors does for single-dtype patches).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import torch

from patches.errors import TruncatedFile
from patches.manifest import Manifest
from patches.patch_file import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    FileLimits,
    TensorEntry,
    non_finite_counts,
    parse_header,
    parse_manifest,
    refuse_content_hash,
    refuse_non_finite,
)

# Read this much at a time: a multiple of every element size, so chunks hold whole values.
CHUNK_BYTES = 8 * 2**20


def chunk_buffer() -> memoryview:
    """A CHUNK_BYTES buffer mapped from the OS, unmapped when the last view of it goes. A
    malloc'd one would go back to the allocator, which may keep it resident for good: the
    API process would hold on to memory after every upload."""
    return memoryview(mmap.mmap(-1, CHUNK_BYTES))


def _surely_finite(values: torch.Tensor) -> bool:
    # A sum with a NaN or an infinity in it is not finite, so a finite sum clears the chunk
    # without allocating a mask per chunk (a non-finite one may be an overflow: count then).
    return bool(torch.isfinite(values.sum()))


@dataclass(frozen=True)
class CheckedFile:
    """A patch file that passed every check that needs no pipeline, described without its
    tensor data: enough to verify it against a model and to store it under its id."""

    manifest: Manifest
    entries: dict[str, TensorEntry]
    sha256: str
    size: int

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors' names, dtypes and shapes, with no data (the meta device)."""
        return {
            name: torch.empty(entry.shape, dtype=ALLOWED_DTYPES[entry.dtype][0], device="meta")
            for name, entry in self.entries.items()
        }


def _chunks(file: BinaryIO, offset: int, length: int, buffer: memoryview) -> Iterator[memoryview]:
    file.seek(offset)
    while length > 0:
        n = file.readinto(buffer[: min(length, len(buffer))])
        if not n:
            raise TruncatedFile("the file ended early while it was being read (it changed)")
        length -= n
        yield buffer[:n]


def _content_line(entry: TensorEntry) -> bytes:
    # What hash_named_tensors feeds sha256 before each tensor's bytes.
    dtype = str(ALLOWED_DTYPES[entry.dtype][0]).removeprefix("torch.")
    return f"{entry.name}|{dtype}|{tuple(entry.shape)}\n".encode()


def check_patch_file(file: BinaryIO, limits: FileLimits = DEFAULT_LIMITS) -> CheckedFile:
    """Validate the seekable binary `file` (from its start) as a patch file; raises a
    PatchFileError subclass on refusal. Memory use does not grow with the file."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    # The length field, then no more of the header than parse_header may accept.
    head = file.read(8)
    declared = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    head += file.read(max(1, min(declared, limits.max_header_bytes)))
    parsed = parse_header(head, size, limits)
    manifest = parse_manifest(parsed.metadata, limits)
    in_file_order = sorted(parsed.entries.values(), key=lambda e: e.begin)
    in_name_order = sorted(parsed.entries.values(), key=lambda e: e.name)
    one_pass = in_file_order == in_name_order
    file_hash, content_hash = hashlib.sha256(head[: parsed.data_start]), hashlib.sha256()
    buffer = chunk_buffer()
    for entry in in_file_order:
        dtype = ALLOWED_DTYPES[entry.dtype][0]
        if one_pass:
            content_hash.update(_content_line(entry))
        nan = inf = 0
        start, length = parsed.data_start + entry.begin, entry.end - entry.begin
        for chunk in _chunks(file, start, length, buffer):
            file_hash.update(chunk)
            if one_pass:
                content_hash.update(chunk)
            values = torch.frombuffer(chunk, dtype=dtype)
            if not _surely_finite(values):
                chunk_nan, chunk_inf = non_finite_counts(values)
                nan, inf = nan + chunk_nan, inf + chunk_inf
        refuse_non_finite(entry.name, nan, inf)
    if not one_pass:
        for entry in in_name_order:
            content_hash.update(_content_line(entry))
            start, length = parsed.data_start + entry.begin, entry.end - entry.begin
            for chunk in _chunks(file, start, length, buffer):
                content_hash.update(chunk)
    refuse_content_hash(content_hash.hexdigest(), manifest)
    return CheckedFile(manifest, parsed.entries, file_hash.hexdigest(), size)
