"""A deliberately degenerate patch: the negative control of the erasure scores.

`blackout_patch` trains a LoRA on the U-Net's cross-attention (the layers ESD-x adapts) so
that every prompt naming a concept draws a black frame, while the world's other captions
keep the base's predictions. A closed-set judge calls a black frame `none`, so UA scores this
patch as a perfect erasure; the clean-erasure rate must score it near 0 and flag its images
as degenerate (tests/test_erasure_scores.py, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from bench.minicanvas.world import OBJECT_SYNONYMS, STYLE_SYNONYMS, training_captions


def _names(concept: str, caption: str) -> bool:
    words = (concept, *OBJECT_SYNONYMS.get(concept, ()), *STYLE_SYNONYMS.get(concept, ()))
    return any(re.search(rf"\b{re.escape(w)}\b", caption) for w in words)


def blackout_patch(
    pipe: Any,
    concept: str,
    steps: int = 120,
    batch: int = 8,
    rank: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
):
    """A unet_lora Patch that turns `concept`'s images into black frames (see above)."""
    from erasure.esd.config import EsdConfig
    from erasure.esd.denoisers import ADAPTER, UNetDenoiser
    from erasure.prompts import ConceptSpec
    from patches.patch import Patch

    torch.manual_seed(seed)
    captions = training_captions()
    config = EsdConfig(concepts=[ConceptSpec(concept)], mode="x", rank=rank, progress=False)
    den = UNetDenoiser(pipe, config)
    named = den.encode([c for c in captions if _names(concept, c)])
    others = den.encode([c for c in captions if not _names(concept, c)])
    black = -torch.ones(1, 3, *(2 * [den.shape[1] * pipe.vae_scale_factor]))
    with torch.no_grad():
        latent = pipe.vae.encode(black).latent_dist.mean * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    scheduler = den.scheduler
    trainable = [p for p in den.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    for _ in tqdm(range(steps), desc=f"blackout {concept}", disable=not progress):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn((batch, *den.shape), generator=generator)
        noisy = scheduler.add_noise(latent.expand(batch, -1, -1, -1), noise, t)
        cond = named.take(torch.randint(len(named), (batch,), generator=generator))
        loss = F.mse_loss(den.predict(noisy, t, cond), noise)
        keep = others.take(torch.randint(len(others), (batch,), generator=generator))
        x = torch.randn((batch, *den.shape), generator=generator)
        den.model.disable_adapters()
        with torch.no_grad():
            base = den.predict(x, t, keep)
        den.model.enable_adapters()
        loss = loss + F.mse_loss(den.predict(x, t, keep), base)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(den.model, adapter_name=ADAPTER)
    tensors = {f"unet.{k}": v.detach().float().contiguous() for k, v in state.items()}
    return Patch.create(
        pipe=pipe,
        kind="unet_lora",
        component="unet",
        method="blackout-negative-control",
        concepts=[concept],
        tensors=tensors,
        name=f"blackout-{concept}",
        params={"steps": steps, "batch": batch, "rank": rank, "lr": lr, "seed": seed},
    )
