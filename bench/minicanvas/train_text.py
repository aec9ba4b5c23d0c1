"""Stage: the mini-CLIP. A CLIPTextModel trained contrastively against a small image encoder.

Positives are defined by class pair (object, style), not by caption identity: captions with
synonyms or implicit style descriptions must land where the canonical caption lands. After
this stage the text encoder is frozen, as SD's CLIP is.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from bench.minicanvas.data import RenderedSet
from bench.minicanvas.judge import strided_encoder
from bench.minicanvas.models import ModelConfig, text_encoder
from bench.minicanvas.world import STYLE_CLASSES


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_text_encoder(
    data: RenderedSet, tokenizer, config: ModelConfig, seed: int, steps: int, batch: int = 256
):
    """Returns (CLIPTextModel, report dict)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = text_encoder(config, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    images_net = strided_encoder(48, config.text_hidden)
    text_proj = nn.Linear(config.text_hidden, config.text_hidden, bias=False)
    logit_scale = nn.Parameter(torch.tensor(2.66))  # exp(2.66) = 1/0.07, CLIP's start
    params = [*encoder.parameters(), *images_net.parameters(), *text_proj.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-4, total_steps=steps)

    keep = [i for i, c in enumerate(data.captions) if c]  # empty captions carry no label
    keep_t = torch.tensor(keep)
    ids = tokenize(tokenizer, [data.captions[i] for i in keep])
    # Causal attention: positions after the last end-of-text token never influence the pooled
    # (end-token) output, so training can drop the shared padded tail and halve its cost.
    ids = ids[:, : int((ids != tokenizer.eos_token_id).sum(1).max()) + 1]
    images = data.tensors(keep)
    pair = torch.from_numpy(data.objects[keep] * len(STYLE_CLASSES) + data.styles[keep])
    started = time.perf_counter()
    encoder.train()
    for _ in tqdm(range(steps), desc="mini-CLIP", unit="step", mininterval=5):
        index = torch.randint(len(keep_t), (batch,), generator=generator)
        text = F.normalize(text_proj(encoder(ids[index]).pooler_output), dim=-1)
        image = F.normalize(images_net(images[index]), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * text @ image.T
        same = (pair[index][:, None] == pair[index][None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    encoder.eval().requires_grad_(False)
    report = {
        "steps": steps,
        "final_loss": round(loss.item(), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return encoder, report
