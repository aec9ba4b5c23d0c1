"""Synthetic text-encoder patches for serving benchmarks: real patch files whose edit is
seeded noise on chosen blocks (serving cost depends on what a patch touches, not on what it
erases)."""

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
