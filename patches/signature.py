"""What verifying a patch needs to know about a model, without its weights.

A `ModelSignature` holds, per patchable component: the base fingerprint in the dtype it is
served in, every base parameter's shape, and the fan-in/fan-out of every Linear and Conv2d
layer (LoRA targets), each Conv2d's kernel size, and the component's config (what a U-Net
module type derives its shapes from). `Patch.verify` checks against it, so a
process that only checks uploads (the server's API process) can keep a signature of a few
hundred KB instead of a copy of the model. Signatures of a live pipeline are built on the
fly and give the same verdicts as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from patches.errors import WrongTarget
from patches.targets import base_named_parameters, pipeline_components, pipeline_family


def _plain(value: Any) -> Any:
    """A config as plain JSON-like values (tuples as lists), safe to pickle and compare."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


@dataclass(frozen=True)
class ComponentSignature:
    name: str
    owner: str  # the pipeline class, for messages
    dtype: str
    fingerprint: str  # of the unpatched base, in `dtype`
    parameters: Mapping[str, tuple[int, ...]]
    layers: Mapping[str, tuple[int, int]]  # Linear / Conv2d path -> (fan in, fan out)
    kernels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # Conv2d path -> size
    config: Mapping[str, Any] = field(default_factory=dict)  # the component's own config

    @classmethod
    def of(cls, name: str, module: torch.nn.Module, owner: str) -> ComponentSignature:
        from patches.patch import base_fingerprint

        dtype, digest = base_fingerprint(module)
        parameters = {n: tuple(p.shape) for n, p in base_named_parameters(module)}
        layers, kernels = {}, {}
        for path, layer in module.named_modules():
            if ".lora_" in path or path.split(".")[-1].startswith("lora_"):
                continue
            path = path.replace(".base_layer", "")
            if isinstance(layer, torch.nn.Linear):
                layers[path] = (layer.in_features, layer.out_features)
            elif isinstance(layer, torch.nn.Conv2d):
                layers[path] = (layer.in_channels, layer.out_channels)
                kernels[path] = tuple(layer.kernel_size)
        config = getattr(module, "config", None)
        plain = _plain(dict(config)) if isinstance(config, Mapping) else {}
        return cls(name, owner, dtype, digest, parameters, layers, kernels, plain)


@dataclass(frozen=True)
class ModelSignature:
    family: str
    owner: str
    components: Mapping[str, ComponentSignature]

    @classmethod
    def of(cls, pipe: Any) -> ModelSignature:
        owner = type(pipe).__name__
        components = {
            name: ComponentSignature.of(name, module, owner)
            for name, module in pipeline_components(pipe).items()
        }
        return cls(pipeline_family(pipe), owner, components)

    def component(self, name: str) -> ComponentSignature:
        if name not in self.components:
            have = ", ".join(sorted(self.components)) or "none"
            raise WrongTarget(
                f"the patch edits '{name}', but this {self.owner} ({self.family}) has only: {have}"
            )
        return self.components[name]


def signature_of(target: Any, component: str) -> ComponentSignature:
    """`target`'s signature for `component`: a ModelSignature's, or built from a pipeline."""
    if isinstance(target, ModelSignature):
        return target.component(component)
    from patches.targets import get_component

    return ComponentSignature.of(component, get_component(target, component), type(target).__name__)
