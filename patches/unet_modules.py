"""U-Net module types for `unet_module` patches: added modules whose outputs are added to a
frozen U-Net's skip connections (its down-path residuals) and mid block, as ControlNet's are
(DuMo's eraser is one).

A patch holds a module type name and a JSON config (manifest `params`: `module_type`,
`module_config`) and tensors only, never code: the module classes live here. A type checks
a patch's tensors against what it expects for the served U-Net (names and shapes) and builds
the module; an unknown type is refused (fail closed), both at upload and in a worker.

Modules reach the U-Net through a forward pre-hook that adds their outputs to the
`down_block_additional_residuals` / `mid_block_additional_residual` the U-Net already
accepts: on every row for `Patch.apply` (`whole_batch_hook`), on the rows that carry them in
the server's per-row denoiser (server/denoiser_routing.py), where rows that carry no module
get zeros, which leave their skips exactly as they were.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from patches.errors import ShapeMismatch, UnknownTensorName, WrongTarget
from patches.signature import ComponentSignature


@dataclass(frozen=True)
class SkipResiduals:
    """What a module adds: one tensor per down-path residual, and one for the mid block."""

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor


class SkipModule(torch.nn.Module, ABC):
    """A module that sees the U-Net's inputs and returns residuals for its skips."""

    @abstractmethod
    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> SkipResiduals: ...


class UnetModuleType(ABC):
    """A kind of added module: which tensors it needs, and how to build it."""

    name: ClassVar[str]

    @abstractmethod
    def expected_shapes(
        self, config: Mapping[str, Any], unet: ComponentSignature
    ) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape this type needs for the U-Net `unet` describes (its config
        and parameter shapes); raises WrongTarget when the config does not fit it."""

    @abstractmethod
    def build(
        self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], unet: Any
    ) -> SkipModule:
        """The module, on the U-Net's device and dtype (tensors already verified)."""


MODULE_TYPES: dict[str, UnetModuleType] = {}


def register_module_type(module_type: UnetModuleType) -> UnetModuleType:
    MODULE_TYPES[module_type.name] = module_type
    return module_type


def module_type_for(params: Mapping[str, Any]) -> UnetModuleType:
    """The type a patch's params name, or WrongTarget (unknown types fail closed)."""
    import patches.skip_eraser  # noqa: F401  (registers the built-in types)

    name = params.get("module_type")
    if name not in MODULE_TYPES:
        known = ", ".join(sorted(MODULE_TYPES)) or "none"
        raise WrongTarget(
            f"unet_module patch of module type {name!r}: this ConceptGuard knows {known}"
        )
    return MODULE_TYPES[name]


def verify_module(
    params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], unet: ComponentSignature
) -> None:
    """The patch's tensors are exactly what its module type needs for this U-Net."""
    module_type = module_type_for(params)
    expected = module_type.expected_shapes(params.get("module_config") or {}, unet)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise UnknownTensorName(
            f"a {module_type.name} module needs tensors {sorted(expected)[:4]}...; the patch "
            f"has {len(unknown)} unexpected ({unknown[:3]}) and lacks {len(missing)} "
            f"({missing[:3]})"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ShapeMismatch(
                f"tensor '{name}' has shape {list(tensors[name].shape)}; a {module_type.name} "
                f"module for this U-Net needs {list(shape)}"
            )


def build_module(params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], unet: Any):
    module_type = module_type_for(params)
    return module_type.build(params.get("module_config") or {}, tensors, unet).eval()


def call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(sample, timestep, encoder_hidden_states) of a U-Net call, however they were passed."""
    names = ("sample", "timestep", "encoder_hidden_states")
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
    return values[0], values[1], values[2]


def with_residuals(kwargs: dict, down: Sequence[torch.Tensor], mid: torch.Tensor) -> dict:
    """The U-Net call's keyword arguments with these residuals added to any it already has."""
    before_down = kwargs.get("down_block_additional_residuals")
    before_mid = kwargs.get("mid_block_additional_residual")
    if before_down is not None:
        down = [b + d for b, d in zip(before_down, down, strict=True)]
    if before_mid is not None:
        mid = before_mid + mid
    kwargs["down_block_additional_residuals"] = tuple(down)
    kwargs["mid_block_additional_residual"] = mid
    return kwargs


def whole_batch_hook(skip_module: SkipModule):
    """A U-Net forward pre-hook adding the module's residuals to every row (`Patch.apply`)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        out = skip_module(*call_inputs(args, kwargs))
        return args, with_residuals(kwargs, out.down, out.mid)

    return hook
