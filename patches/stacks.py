"""Composing an ordered patch stack into the weights it stands for, without touching a model.

Applying patches one after another to a live component (`Patch.apply`) is the reference
meaning of a stack. A server holding many tenants cannot do that to its one shared model, so
it composes each tenant's stack off to the side: per edited parameter, the value the
component would hold after the whole stack was applied, bit for bit (the same combine rule,
`kinds.combined_value`, in the same order). Patches on different tensors simply combine; two
patches on the same tensor follow their modes in order - a later override replaces, a later
delta is added to what is there (task arithmetic over the base). The result says where that
happened, because summed or replaced edits can hurt concepts neither patch was made for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from patches.errors import NonFiniteValues, WrongTarget
from patches.kinds import combined_value
from patches.patch import Patch
from patches.targets import base_named_parameters, get_component

logger = logging.getLogger(__name__)

WEIGHT_KINDS = ("text_encoder", "unet_weights")


@dataclass(frozen=True)
class ComposedWeights:
    """The parameters of one component that a stack edits, as they would be once applied."""

    component: str
    tensors: dict[str, torch.Tensor]
    # parameter name -> ids of the patches that edited it, for names edited more than once
    overlaps: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def base_parameters(pipe: object, component: str) -> dict[str, torch.Tensor]:
    """A component's base parameters by name (what stacks compose over)."""
    return dict(base_named_parameters(get_component(pipe, component)))


def compose_weight_stack(
    pipe: object,
    stack: Sequence[Patch],
    base: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, ComposedWeights]:
    """Per component, the edited parameters after applying `stack` in order to `pipe`'s base.

    Every patch must already be verified against `pipe` (`Patch.verify`), whose components
    must be unpatched. `base` (component -> `base_parameters`) stands in for reading the
    live pipeline, for callers that compose while the pipeline serves. Refuses kinds that are
    not plain weights and non-finite results.
    """
    values: dict[str, dict[str, torch.Tensor]] = {}
    editors: dict[str, dict[str, list[str]]] = {}
    with torch.no_grad():
        for patch in stack:
            kind, component = patch.manifest.kind, patch.manifest.target.component
            if kind not in WEIGHT_KINDS:
                raise WrongTarget(
                    f"patch {patch.id[:12]} is a {kind} patch; only {' and '.join(WEIGHT_KINDS)} "
                    "patches compose into per-tenant weights"
                )
            originals = base[component] if base else base_parameters(pipe, component)
            current = values.setdefault(component, {})
            for name, tensor in patch.weight_edits().items():
                before = current.get(name, originals[name])
                current[name] = combined_value(before, tensor, patch.manifest.mode)
                editors.setdefault(component, {}).setdefault(name, []).append(patch.id)
    composed = {}
    for component, tensors in values.items():
        bad = sorted(name for name, t in tensors.items() if not torch.isfinite(t).all())
        if bad:
            raise NonFiniteValues(
                f"the stack gives non-finite values for {len(bad)} parameter(s) of {component} "
                f"(first: {bad[0]}): the served dtype cannot hold the combined weights"
            )
        overlaps = {n: tuple(ids) for n, ids in editors[component].items() if len(ids) > 1}
        if overlaps:
            logger.warning(
                "stack edits %d parameter(s) of %s with more than one patch (e.g. %s by %s); "
                "overrides replace earlier values and deltas are summed over the base",
                len(overlaps),
                component,
                next(iter(overlaps)),
                ", ".join(pid[:12] for pid in next(iter(overlaps.values()))),
            )
        composed[component] = ComposedWeights(component, tensors, overlaps)
    return composed
