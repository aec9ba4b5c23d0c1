"""Synthetic patches for serving benchmarks: real patch files whose edit is seeded noise on
the layers a method would touch (serving cost depends on what a patch touches, not on what
it erases): text-encoder blocks (HiRM-shaped) and U-Net LoRA adapters (ESD-shaped)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from patches.patch import Patch
from patches.targets import block_parameter_names


def noise_patch(pipe: Any, seed: int, blocks: Sequence[int] = (0,), scale: float = 0.05) -> Patch:
    """A text_encoder override patch moving `blocks` of the encoder by seeded noise."""
    encoder = pipe.text_encoder
    params = dict(encoder.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in block_parameter_names(encoder, list(blocks)):
        base = params[name].detach().float().cpu()
        tensors[name] = (base + scale * torch.randn(base.shape, generator=generator)).to(
            params[name].dtype
        )
    return Patch.create(
        pipe=pipe,
        kind="text_encoder",
        component="text_encoder",
        method="bench-noise",
        concepts=[f"noise{seed}"],
        tensors=tensors,
    )


def lora_noise_patch(pipe: Any, seed: int, rank: int = 4, mode: str = "x") -> Patch:
    """A unet_lora patch shaped like ESD's (`mode` x: cross-attention; u: the rest), with
    seeded random factors of the size a trained adapter has."""
    import re

    from erasure.esd.config import TARGET_MODULES
    from patches.targets import denoiser_component

    component = denoiser_component(pipe)
    pattern = re.compile(TARGET_MODULES[component][mode])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in getattr(pipe, component).named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            b = 0.05 * torch.randn(module.out_features, rank, generator=generator)
            tensors[f"{component}.{name}.lora_A.weight"] = a
            tensors[f"{component}.{name}.lora_B.weight"] = b
    return Patch.create(
        pipe=pipe,
        kind="unet_lora",
        component=component,
        method="bench-lora",
        concepts=[f"lora{seed}"],
        tensors=tensors,
        params={"rank": rank, "esd_mode": mode},
    )


def dumo_noise_patch(pipe: Any, seed: int, width: float = 1.0) -> Patch:
    """A unet_module patch (DuMo's eraser, module type dumo_epr) of the size a trained one
    has: the U-Net's own down path and mid block, seeded random output convolutions, the
    prompt gate open for every prompt (what costs the most: the module runs on its rows)."""
    from patches.skip_eraser import SkipEraser, initialised_from

    config = {"width": width, "buckets": 20}
    module = initialised_from(pipe.unet, SkipEraser(dict(pipe.unet.config), config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*module.skip_outs, module.mid_out]:
            noise = torch.randn(conv.weight.shape, generator=generator)
            conv.weight.copy_(0.01 * noise.to(conv.weight))
    return Patch.create(
        pipe=pipe,
        kind="unet_module",
        component="unet",
        method="bench-dumo",
        concepts=[f"module{seed}"],
        tensors=module.state_tensors(),
        params={"module_type": "dumo_epr", "module_config": config},
    )
