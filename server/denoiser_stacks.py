"""A tenant's denoiser patches, prepared once for per-row serving (server/denoiser_routing.py).

Whatever kinds a stack holds, the denoiser sees two things:
- per adapted layer, ONE low-rank adapter: the stack's LoRA pairs (`unet_lora`) and its exact
  factors of dense weight edits (`unet_weights`, e.g. UCE / ErasePro cross-attention edits;
  patches/lowrank.py), concatenated, so a stack of several acts as one adapter whose rank is
  the sum;
- the stack's added modules (`unet_module`), in stack order; their residuals sum.
The result equals applying the stack to the denoiser with `Patch.apply`: dense edits
compose over the base first (`compose_weight_stack`: later overrides replace, deltas add),
and LoRA adapters add on top of whatever weights are there, in any order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from patches.errors import ShapeMismatch, WrongTarget
from patches.kinds import lora_pairs
from patches.lowrank import LowRank, concatenate, factor_exactly, lora_as_lowrank
from patches.patch import Patch
from patches.stacks import compose_weight_stack
from patches.targets import base_named_parameters, denoiser_component
from patches.unet_modules import SkipModule, build_module

DENOISER_KINDS = ("unet_lora", "unet_weights", "unet_module")


@dataclass(frozen=True)
class LayerShape:
    """What per-row serving needs to know about an adapted Linear or Conv2d layer."""

    kind: Literal["linear", "conv2d"]
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()

    @classmethod
    def of(cls, module: torch.nn.Module, path: str) -> LayerShape:
        # A layer wrapped by peft (a pipeline that had LoRA loaded) has its own inside.
        module = getattr(module, "base_layer", module)
        if isinstance(module, torch.nn.Linear):
            return cls("linear", module.in_features, module.out_features)
        if (
            isinstance(module, torch.nn.Conv2d)
            and module.groups == 1
            and module.dilation == (1, 1)
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        ):
            return cls(
                "conv2d",
                module.in_channels,
                module.out_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(module.padding),
            )
        raise WrongTarget(
            f"'{path}' is a {type(module).__name__}; per-row serving adapts Linear layers and "
            "plain Conv2d layers (no groups, dilation or padding mode)"
        )

    def check(self, factors: LowRank, path: str) -> None:
        a_tail = (self.in_features, *self.kernel)
        if tuple(factors.a.shape[1:]) != a_tail or factors.b.shape[0] != self.out_features:
            raise ShapeMismatch(
                f"the adapter for '{path}' has factors A {list(factors.a.shape)} and B "
                f"{list(factors.b.shape)}; this {self.kind} layer needs A [rank, "
                f"{', '.join(map(str, a_tail))}] and B [{self.out_features}, rank]"
            )


@dataclass(frozen=True)
class DenoiserStack:
    """One stack's denoiser part: a low-rank adapter per layer, and added modules."""

    patch_ids: tuple[str, ...]
    layers: Mapping[str, LowRank]
    shapes: Mapping[str, LayerShape]
    modules: tuple[SkipModule, ...] = ()

    @property
    def nbytes(self) -> int:
        tensors = [t for f in self.layers.values() for t in (f.a, f.b)]
        tensors += [t for m in self.modules for t in m.state_dict().values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def rank(self, path: str) -> int:
        return self.layers[path].rank


def build_denoiser_stack(
    pipe: Any,
    patches: Sequence[Patch],
    max_rank: int,
    base: Mapping[str, torch.Tensor] | None = None,
) -> DenoiserStack | None:
    """The denoiser part of a stack (its patches verified against `pipe`, in stack order),
    or None when it has none. Refuses what per-row serving cannot take (WrongTarget).

    Reads the denoiser's modules and (unless given as `base`) its base parameters, never
    changes anything: safe beside a running forward, whose hooks leave both as they are."""
    if not patches:
        return None
    component = denoiser_component(pipe)
    denoiser = getattr(pipe, component)
    parts: dict[str, list[LowRank]] = {}
    dense = [p for p in patches if p.manifest.kind == "unet_weights"]
    if dense:
        base = base or dict(base_named_parameters(denoiser))
        composed = compose_weight_stack(pipe, dense, {component: base})[component]
        for name, value in composed.tensors.items():
            path, _, leaf = name.rpartition(".")
            if leaf != "weight":
                raise WrongTarget(
                    f"the stack edits '{name}'; per-row serving takes dense edits of layer "
                    "weights only (a bias edit cannot be a low-rank adapter)"
                )
            delta = value.float() - base[name].float()
            parts.setdefault(path, []).append(factor_exactly(delta, max_rank, f"'{path}'"))
    for patch in patches:
        if patch.manifest.kind == "unet_lora":
            for path, (a, b) in lora_pairs(patch.tensors, component).items():
                parts.setdefault(path, []).append(lora_as_lowrank(a, b))
    layers, shapes = {}, {}
    for path, factors in parts.items():
        nonzero = [f for f in factors if f.rank]
        if not nonzero:
            continue  # dense edits that left this layer as it was
        adapter = concatenate(nonzero)
        if adapter.rank > max_rank:
            raise WrongTarget(
                f"the stack's adapters on '{path}' add up to rank {adapter.rank}; per-row "
                f"serving takes at most {max_rank} per layer"
            )
        shapes[path] = LayerShape.of(denoiser.get_submodule(path), path)
        shapes[path].check(adapter, path)
        layers[path] = adapter
    modules = tuple(
        build_module(p.manifest.params, p.tensors, denoiser)
        for p in patches
        if p.manifest.kind == "unet_module"
    )
    return DenoiserStack(tuple(p.id for p in patches), layers, shapes, modules)
