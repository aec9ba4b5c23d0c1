"""Per-kind rules: which tensor names a kind may hold, how it is checked against a component,
and how it is applied to / removed from a live pipeline.

Applied patches are recorded on the component module itself (a component may be shared by
several pipelines, e.g. one CLIP encoder in an SD and a Flux pipeline), as a stack: removal is
last-in first-out and restores the saved originals, so the base comes back bit-exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from patches.errors import (
    BadTensorEntry,
    BadTensorNames,
    ShapeMismatch,
    UnknownTensorName,
    WrongTarget,
)
from patches.manifest import Manifest
from patches.targets import base_named_parameters
from patches.unet_modules import build_module, whole_batch_hook

_LORA_KEY = re.compile(
    r"^(?P<component>unet|transformer)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$"
)


@dataclass
class AppliedPatch:
    """What it takes to undo one applied patch."""

    patch_id: str
    kind: str
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_name: str | None = None
    hook: Any = None  # a unet_module's forward pre-hook handle


def applied_stack(module: torch.nn.Module) -> list[AppliedPatch]:
    """The patches currently applied to a component, oldest first."""
    return module.__dict__.setdefault("_conceptguard_applied", [])


def _list_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- weights: text_encoder and unet_weights (override or delta on named parameters) -------


def _parameters_by_name(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(base_named_parameters(module))


def verify_weights(
    shapes: Mapping[str, tuple[int, ...]], parameters: Mapping[str, tuple[int, ...]], label: str
) -> None:
    """Every edited parameter (`shapes`: name -> the edit's shape) is a base parameter of the
    component (`parameters`: name -> shape) and has its shape."""
    unknown = sorted(n for n in shapes if n not in parameters)
    if unknown:
        example = next(iter(parameters), "nothing")
        raise UnknownTensorName(
            f"the patch edits {len(unknown)} tensor(s) that this {label} does not have: "
            f"{_list_names(unknown)} (its parameters are named like '{example}')"
        )
    for name, shape in shapes.items():
        if tuple(shape) != tuple(parameters[name]):
            raise ShapeMismatch(
                f"tensor '{name}' has shape {list(shape)} but this {label}'s parameter "
                f"has shape {list(parameters[name])}"
            )


def combined_value(current: torch.Tensor, tensor: torch.Tensor, mode: str) -> torch.Tensor:
    """What a parameter holding `current` holds after a weights patch's `tensor` is applied.

    The one rule for override and delta patches, shared by `apply_weights` and the server's
    per-tenant stacks (patches/stacks.py), so both give bit-identical weights.
    """
    value = tensor.to(device=current.device)
    if mode in ("delta", "lowrank"):  # a lowrank edit arrives multiplied out (Patch.weight_edits)
        # Add in float32 so a half-precision base does not lose the delta's low bits.
        value = current.detach().float() + value.float()
    return value.to(current.dtype)


def apply_weights(patch_id: str, manifest: Manifest, edits, module) -> AppliedPatch:
    """`edits`: parameter name -> dense value or delta (`Patch.weight_edits`)."""
    params = _parameters_by_name(module)
    record = AppliedPatch(patch_id, manifest.kind)
    with torch.no_grad():
        for name, tensor in edits.items():
            param = params[name]
            record.originals[name] = param.detach().clone()
            param.copy_(combined_value(param, tensor, manifest.mode))
    return record


def remove_weights(record: AppliedPatch, module: torch.nn.Module) -> None:
    params = _parameters_by_name(module)
    with torch.no_grad():
        for name, original in record.originals.items():
            params[name].copy_(original)


# --- unet_lora: diffusers/peft LoRA tensors ------------------------------------------------


def lora_pairs(tensors: dict[str, torch.Tensor], component: str) -> dict[str, tuple]:
    """Group LoRA tensors by module path; checks naming and rank consistency."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name)
        if not match or match["component"] != component:
            raise BadTensorNames(
                f"tensor '{name}' is not a LoRA weight of the {component}; expected names like "
                f"'{component}.<module path>.lora_A.weight' / '.lora_B.weight'"
            )
        groups.setdefault(match["module"], {})[match["ab"]] = tensor
    pairs = {}
    for module_path, ab in groups.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise BadTensorNames(f"'{module_path}' has no {missing}.weight; LoRA comes in pairs")
        a, b = ab["A"], ab["B"]
        if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != b.shape[1]:
            raise BadTensorEntry(
                f"'{module_path}': lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
                "form a LoRA pair (expected A [rank, in] and B [out, rank])"
            )
        pairs[module_path] = (a, b)
    return pairs


def verify_lora(
    manifest: Manifest,
    tensors,
    layers: Mapping[str, tuple[int, int]],
    kernels: Mapping[str, tuple[int, ...]],
) -> None:
    """Every LoRA pair adapts a Linear/Conv2d layer of the component (`layers`: path ->
    (fan in, fan out); `kernels`: Conv2d path -> kernel size) with matching sizes, laid out
    as peft makes it (a convolution's lora_A has the layer's kernel, its lora_B is 1x1)."""
    component = manifest.target.component
    for path, (a, b) in lora_pairs(tensors, component).items():
        if path not in layers:
            raise UnknownTensorName(
                f"the LoRA adapts '{path}', which is not a Linear or Conv2d layer of this "
                f"{component}"
            )
        fan_in, fan_out = layers[path]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise ShapeMismatch(
                f"the LoRA for '{path}' maps {a.shape[1]} -> {b.shape[0]} features but the "
                f"layer maps {fan_in} -> {fan_out}"
            )
        kernel = kernels.get(path)
        if kernel:
            layer = f"a convolution with kernel {list(kernel)}"
            fits = a.dim() == 4 and a.shape[2:] == kernel and b.shape[2:] == (1, 1)
        else:
            layer, fits = "a Linear layer", a.dim() == 2
        if not fits:
            raise ShapeMismatch(
                f"the LoRA for '{path}' has lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)}, which do not fit {layer}"
            )


def _lora_adapters(module: torch.nn.Module) -> list[str]:
    return [r.adapter_name for r in applied_stack(module) if r.adapter_name]


def load_denoiser_lora(pipe, component: str, tensors, adapter_name: str) -> None:
    """Load a `unet_lora` patch's tensors as a peft adapter on the denoiser only.

    Same keys and result as `pipe.load_lora_weights`, which also scans the text encoders and
    logs that it found no LoRA for them: misleading noise on every load in a server log.
    """
    getattr(pipe, component).load_lora_adapter(
        {k: v.clone() for k, v in tensors.items()},
        prefix=component,
        adapter_name=adapter_name,
        _pipeline=pipe,  # as load_lora_weights passes it: keeps CPU offloading hooks intact
    )


def apply_lora(patch_id: str, tensors, pipe, component: str) -> AppliedPatch:
    if not hasattr(pipe, "load_lora_weights"):
        raise WrongTarget(f"{type(pipe).__name__} cannot load LoRA adapters")
    module = getattr(pipe, component)
    name = f"cg_{patch_id[:16]}"
    if name in _lora_adapters(module):
        raise WrongTarget(f"patch {patch_id[:12]} is already applied to this pipeline")
    # Scale is folded into lora_B when a patch is made, so the adapter runs at weight 1.
    load_denoiser_lora(pipe, component, tensors, name)
    pipe.set_adapters([*_lora_adapters(module), name])
    return AppliedPatch(patch_id, "unet_lora", adapter_name=name)


def remove_lora(record: AppliedPatch, pipe, module) -> None:
    remaining = [n for n in _lora_adapters(module) if n != record.adapter_name]
    if remaining:
        pipe.delete_adapters(record.adapter_name)
        pipe.set_adapters(remaining)
    else:
        # The last adapter: unwrap peft's layers too, so the module tree is the base's again.
        pipe.unload_lora_weights()


# --- unet_module: an added module on the U-Net's skip connections -------------------------


def apply_module(patch_id: str, manifest: Manifest, tensors, unet) -> AppliedPatch:
    """Build the patch's module (patches/unet_modules.py) and add its residuals to every
    forward of the U-Net; removing the patch removes the hook."""
    module = build_module(manifest.params, tensors, unet)
    handle = unet.register_forward_pre_hook(whole_batch_hook(module), with_kwargs=True)
    return AppliedPatch(patch_id, "unet_module", hook=handle)
