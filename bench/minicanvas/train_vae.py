"""Stage: the VAE (AutoencoderKL, 32x32x3 <-> 8x8x4) and its latent scaling factor.

The scaling factor is measured (1 / std of the latents), not SD's 0.18215: the diffusion
schedule assumes unit-variance latents, and a wrong scale silently shifts every noise level.
"""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

from bench.minicanvas.data import RenderedSet
from bench.minicanvas.models import ModelConfig, vae

KL_WEIGHT = 1e-6


def train_vae(data: RenderedSet, config: ModelConfig, seed: int, steps: int, batch: int = 64):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = vae(config)
    images = data.tensors()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps)
    started = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc="VAE", unit="step", mininterval=5):
        x = images[torch.randint(len(images), (batch,), generator=generator)]
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample(generator=generator)).sample
        loss = F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        sample = images[:2048]
        latents = torch.cat(
            [model.encode(sample[i : i + 256]).latent_dist.mean for i in range(0, len(sample), 256)]
        )
        recon = torch.cat(
            [model.decode(latents[i : i + 256]).sample for i in range(0, len(latents), 256)]
        )
    scaling = float(1.0 / latents.std())
    model.register_to_config(scaling_factor=scaling)
    mse = float(F.mse_loss(recon.clamp(-1, 1), sample)) / 4  # images in [-1, 1] -> [0, 1]
    report = {
        "steps": steps,
        "scaling_factor": round(scaling, 5),
        "psnr_db": round(10 * torch.log10(torch.tensor(1.0 / mse)).item(), 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return model, report


@torch.no_grad()
def encode_latents(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latent means, the U-Net's training targets."""
    parts = [
        model.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)
    ]
    return torch.cat(parts) * model.config.scaling_factor


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    parts = []
    for i in range(0, len(images), batch):
        parts.append(model.decode(model.encode(images[i : i + batch]).latent_dist.mean).sample)
    return torch.cat(parts).clamp(-1, 1)
