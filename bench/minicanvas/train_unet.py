"""Stage: the U-Net, trained on cached VAE latents and frozen-text-encoder token states.

Epsilon prediction on DDPM's linear schedule, classifier-free guidance by empty captions in
the data (~10%), an EMA of the weights (what is saved), checkpoints every few hundred steps so
the run can stop and resume anywhere.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from bench.minicanvas.checkpoint import load_checkpoint, save_checkpoint
from bench.minicanvas.models import ModelConfig, train_scheduler, unet
from bench.minicanvas.train_text import tokenize

EMA_DECAY = 0.999


@torch.no_grad()
def caption_states(
    text_encoder, tokenizer, captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [n_unique, L, D], index [n]) so each caption is encoded once."""
    unique = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    ids = tokenize(tokenizer, unique)
    states = torch.cat([text_encoder(ids[i : i + 512])[0] for i in range(0, len(ids), 512)])
    index = torch.tensor([lookup[c] for c in captions])
    return states, index


def train_unet(
    latents: torch.Tensor,
    states: torch.Tensor,
    caption_index: torch.Tensor,
    config: ModelConfig,
    seed: int,
    steps: int,
    checkpoint: Path,
    batch: int = 128,
    lr: float = 4e-4,
    checkpoint_every: int = 250,
    device: str = "cpu",
):
    """Train (or resume) and return (EMA U-Net, report dict)."""
    torch.manual_seed(seed)
    model = unet(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    noise_schedule = train_scheduler()
    alphas = noise_schedule.alphas_cumprod.to(device)
    start, seconds = 0, 0.0
    ema_path = checkpoint.with_suffix(".ema.safetensors")
    if checkpoint.exists():
        progress = load_checkpoint(checkpoint, model, optimizer)
        ema.load_state_dict(_load_state(ema_path))
        start, seconds = progress["step"], progress["seconds"]
    generator = torch.Generator().manual_seed(seed + start)  # resumes draw fresh batches
    latents, states, caption_index = latents.to(device), states.to(device), caption_index.to(device)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        warm = min(1.0, (step + 1) / 200)
        progress = step / max(1, steps)
        return (
            lr * warm * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * 3.14159)).item()))
        )

    model.train()
    started = time.perf_counter()
    bar = tqdm(
        range(start, steps), desc="U-Net", unit="step", initial=start, total=steps, mininterval=10
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        index = torch.randint(len(latents), (batch,), generator=generator).to(device)
        x0 = latents[index]
        context = states[caption_index[index]]
        t = torch.randint(0, len(alphas), (batch,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(noisy, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            elapsed = seconds + time.perf_counter() - started
            _save_state(ema_path, ema)
            save_checkpoint(checkpoint, model, optimizer, {"step": step + 1, "seconds": elapsed})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    total = seconds + time.perf_counter() - started
    return ema.eval().to("cpu"), {"steps": steps, "seconds": round(total, 1), "batch": batch}


def _save_state(path: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import save

    from patches.atomic import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, save(state))


def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
