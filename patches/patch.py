"""`Patch`: a manifest plus tensors, saved as one safetensors file.

Like a diffusers component, a Patch has `save`/`load`; unlike one, loading is strict, because
patch files come from outside (uploads, other teams) and are refused on any doubt.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

import patches
from patches import kinds
from patches.atomic import atomic_write_bytes
from patches.errors import (
    BadTensorNames,
    BaseFingerprintMismatch,
    FileTooLarge,
    StackOrderError,
    WrongTarget,
)
from patches.lowrank import split_lowrank
from patches.manifest import FORMAT_VERSION, METADATA_KEY, Manifest, Target, now_utc
from patches.patch_file import DEFAULT_LIMITS, FileLimits, decode_patch_bytes
from patches.targets import (
    FINGERPRINT_DTYPES,
    fingerprint,
    get_component,
    hash_named_tensors,
    module_dtype_name,
    pipeline_family,
)
from patches.unet_modules import verify_module


def base_fingerprint(module: torch.nn.Module) -> tuple[str, str]:
    """(dtype, hash) of a component as it was before any patch was applied to it."""
    stack = kinds.applied_stack(module)
    if stack:
        return module.__dict__["_conceptguard_base_fingerprint"]
    dtype = module_dtype_name(module)
    digest = fingerprint(module, dtype if dtype in FINGERPRINT_DTYPES else None)
    return dtype, digest


def _fingerprints_for_manifest(module: torch.nn.Module) -> dict[str, str]:
    # A 16-bit base cannot vouch for float32 weights it has already rounded away.
    dtype = module_dtype_name(module)
    wanted = list(FINGERPRINT_DTYPES) if dtype == "float32" else ["float16", "bfloat16"]
    return {name: fingerprint(module, name) for name in wanted}


@dataclass
class Patch:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    _bytes: bytes | None = field(default=None, repr=False, compare=False)
    _id: str | None = field(default=None, repr=False, compare=False)

    # --- making ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        pipe: Any,
        kind: str,
        component: str,
        method: str,
        concepts: list[str],
        tensors: dict[str, torch.Tensor],
        mode: str | None = None,
        params: dict[str, Any] | None = None,
        name: str | None = None,
        eval: dict[str, Any] | None = None,
    ) -> Patch:
        """Build a patch for `pipe`'s unpatched `component` (methods call this)."""
        module = get_component(pipe, component)
        if kinds.applied_stack(module):
            raise WrongTarget("make patches on an unpatched base: remove applied patches first")
        default_mode = {"unet_lora": "lora", "unet_module": "module"}.get(kind, "override")
        stored = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        manifest = Manifest.parse(
            {
                "format_version": FORMAT_VERSION,
                "kind": kind,
                "mode": mode or default_mode,
                "method": method,
                "name": name,
                "concepts": list(concepts),
                "params": params or {},
                "target": Target(family=pipeline_family(pipe), component=component),
                "base_fingerprint": _fingerprints_for_manifest(module),
                "created_at": now_utc(),
                "conceptguard_version": patches.__version__,
                "content_sha256": hash_named_tensors(stored.items(), None),
                "eval": eval,
            }
        )
        patch = cls(manifest, stored)
        patch.check_structure()
        return patch

    # --- bytes and files ------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The canonical file bytes (one metadata key, so the bytes are reproducible)."""
        if self._bytes is None:
            metadata = {METADATA_KEY: self.manifest.to_json()}
            self._bytes = save_safetensors_bytes(self.tensors, metadata=metadata)
        return self._bytes

    @property
    def id(self) -> str:
        """sha256 of the file bytes: the registry's content address (hashed once, like the
        bytes it is the hash of: stacks ask for it many times)."""
        if self._id is None:
            self._id = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._id

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, path: str | os.PathLike) -> str:
        """Write atomically (never a half-written file at `path`); returns the patch id."""
        atomic_write_bytes(Path(path), self.to_bytes())
        return self.id

    @classmethod
    def from_bytes(cls, data: bytes, limits: FileLimits = DEFAULT_LIMITS) -> Patch:
        """Parse and validate untrusted bytes; raises a PatchFileError subclass on refusal."""
        manifest, tensors = decode_patch_bytes(data, limits)
        patch = cls(manifest, tensors, _bytes=bytes(data))
        patch.check_structure()
        return patch

    @classmethod
    def load(cls, path: str | os.PathLike, limits: FileLimits = DEFAULT_LIMITS) -> Patch:
        size = os.stat(path).st_size
        if size > limits.max_file_bytes:
            raise FileTooLarge(
                f"{path} is {size} bytes; patches may be at most {limits.max_file_bytes} bytes"
            )
        return cls.from_bytes(Path(path).read_bytes(), limits)

    # --- checking -------------------------------------------------------------------

    def check_structure(self) -> None:
        """Kind-specific naming rules that need no pipeline."""
        kind, component = self.manifest.kind, self.manifest.target.component
        if kind == "unet_lora":
            kinds.lora_pairs(self.tensors, component)
        elif kind == "unet_module":
            bad = [n for n in self.tensors if not n.startswith(("module.", "tlmo."))]
            if bad:
                raise BadTensorNames(
                    f"unet_module tensors must be named 'module.*' or 'tlmo.*'; found {bad[0]!r}"
                )
        else:
            lora = [n for n in self.tensors if ".lora_" in n]
            if lora:
                raise BadTensorNames(
                    f"a {kind} patch holds dense tensors, but '{lora[0]}' is a LoRA weight; "
                    "LoRA belongs in a unet_lora patch"
                )
            if self.manifest.mode == "lowrank":
                split_lowrank(self.tensors)

    def edit_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape of what a text_encoder / unet_weights patch edits (a
        factor pair's product shape, computed without multiplying)."""
        if self.manifest.mode != "lowrank":
            return {name: tuple(t.shape) for name, t in self.tensors.items()}
        factors, dense = split_lowrank(self.tensors)
        shapes = {name: tuple(t.shape) for name, t in dense.items()}
        shapes.update((name, f.shape) for name, f in factors.items())
        return shapes

    def weight_edits(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the edit of a text_encoder / unet_weights patch, as its mode
        combines it with the base (`kinds.combined_value`): a lowrank patch's factors
        multiplied out in float32, each time (not kept: that would hold the dense bytes the
        factors save for as long as the patch is cached)."""
        if self.manifest.mode != "lowrank":
            return self.tensors
        factors, dense = split_lowrank(self.tensors)
        edits = {name: t.float() for name, t in dense.items()}
        edits.update((name, f.dense()) for name, f in factors.items())
        return edits

    def verify(self, target: Any) -> None:
        """Check this patch fits `target` (a pipeline, or its ModelSignature): component,
        base fingerprint, tensor names and shapes."""
        from patches.signature import signature_of

        component = self.manifest.target.component
        signature = signature_of(target, component)
        dtype, actual = signature.dtype, signature.fingerprint
        expected = self.manifest.base_fingerprint.get(dtype)
        if expected is None:
            raise BaseFingerprintMismatch(
                f"this pipeline's {component} is served in {dtype}, but the patch records "
                f"base fingerprints only for {', '.join(self.manifest.base_fingerprint)}"
            )
        if expected != actual:
            raise BaseFingerprintMismatch(
                f"the patch edits {component} of a base whose fingerprint ({dtype}) is "
                f"{expected[:12]}...; this pipeline's {component} has {actual[:12]}... "
                "(a patch only applies to the exact model it was made for)"
            )
        kind = self.manifest.kind
        if kind in ("text_encoder", "unet_weights"):
            kinds.verify_weights(self.edit_shapes(), signature.parameters, component)
        elif kind == "unet_lora":
            kinds.verify_lora(self.manifest, self.tensors, signature.layers, signature.kernels)
        else:
            verify_module(self.manifest.params, self.tensors, signature)

    # --- applying -------------------------------------------------------------------

    def apply(self, pipe: Any) -> None:
        """Verify, then apply on top of whatever is already applied to the component."""
        self.verify(pipe)
        module = get_component(pipe, self.manifest.target.component)
        stack = kinds.applied_stack(module)
        if any(r.patch_id == self.id for r in stack):
            raise WrongTarget(f"patch {self.id[:12]} is already applied to this pipeline")
        if not stack:
            module.__dict__["_conceptguard_base_fingerprint"] = base_fingerprint(module)
        if self.manifest.kind == "unet_lora":
            record = kinds.apply_lora(self.id, self.tensors, pipe, self.manifest.target.component)
        elif self.manifest.kind == "unet_module":
            record = kinds.apply_module(self.id, self.manifest, self.tensors, module)
        else:
            record = kinds.apply_weights(self.id, self.manifest, self.weight_edits(), module)
        stack.append(record)

    def remove(self, pipe: Any) -> None:
        """Undo `apply`; the most recently applied patch of a component goes first."""
        module = get_component(pipe, self.manifest.target.component)
        stack = kinds.applied_stack(module)
        if not stack or stack[-1].patch_id != self.id:
            applied = [r.patch_id[:12] for r in stack]
            raise StackOrderError(
                f"patch {self.id[:12]} is not the last one applied to "
                f"{self.manifest.target.component} (applied, oldest first: {applied or 'none'})"
            )
        record = stack.pop()
        if record.adapter_name:
            kinds.remove_lora(record, pipe, module)
        elif record.hook is not None:
            record.hook.remove()
        else:
            kinds.remove_weights(record, module)
