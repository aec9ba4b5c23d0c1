"""Textual inversion through the patched model (CCE, "concept-erasure circumvention"): one new
token embedding learned so that the PATCHED model reconstructs images of the concept.

The embedding takes the concept word's place in each context's prompt; only that vector
trains (Adam on the denoising loss of the patched U-Net and text encoder, over the base
model's concept images and sampled timesteps). It starts from the mean token embedding, not
from the concept's own; the images of that start are judged too (`asr_start`), since a
model may draw the concept for an uninformative token. A hosted tenant sends text and
cannot inject an embedding, so this is not a tenant threat: it is reported separately, as
evidence of whether the concept is still latent in the patched model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from erasure.attacks.arena import Arena, denoising_loss
from erasure.attacks.results import AttackResult
from erasure.attacks.tokens import layout, single_encoder, token_embeddings
from erasure.prompts import SLOT


@dataclass(frozen=True)
class InversionBudget:
    steps: int = 200
    lr: float = 0.005
    batch: int = 8  # concept images per step
    draws: int = 1  # sampled (t, eps) per image and step
    # Base concept images per context to learn from. With 2, on the MiniCanvas base the
    # learned token drew the object in 51 of 64 images (star 0 of 8); with 4, 56 of 64
    # (star 2 of 8) - calibration asks >= 80% - for a few seconds more per object.
    per_context: int = 4
    contexts: int = 4  # contexts it is learned in and judged in (0: all)


class _Placeholder:
    """Each context's prompt with the learned vector in the concept word's place."""

    def __init__(self, arena: Arena, templates: list[str]):
        self.encoder = arena.pipe.text_encoder
        table = self.encoder.get_input_embeddings().weight.detach()
        rows, slots = [], []
        for template in templates:
            before, _, after = template.partition(SLOT)
            ids, slot = layout(arena.tokenizer, before, 1, after)
            rows.append(ids)
            slots.append(slot.start)
        self.ids = torch.stack(rows)
        self.slots = torch.tensor(slots)
        self.fixed = table[self.ids]
        self.start = table.mean(0)

    def states(self, vector: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        embeddings = self.fixed[rows].clone()
        embeddings[torch.arange(len(rows)), self.slots[rows]] = vector
        with token_embeddings(self.encoder, embeddings):
            return self.encoder(self.ids[rows])[0]


def run(arena: Arena, budget: InversionBudget) -> AttackResult:
    single_encoder(arena.pipe)
    started = time.perf_counter()
    contexts = arena.concept.first(budget.contexts)
    images = arena.concept_images(contexts, budget.per_context)
    names = [c.name for c in contexts]
    placeholder = _Placeholder(arena, [c.template for c in contexts])
    row_of = torch.tensor([names.index(c.name) for c in images.contexts])
    vector = placeholder.start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=budget.lr)
    generator = torch.Generator().manual_seed(arena.seed)
    losses = []
    for _ in tqdm(range(budget.steps), desc="textual inversion", disable=not arena.progress):
        pick = torch.randperm(len(images.latents), generator=generator)[: budget.batch]
        states = placeholder.states(vector, row_of[pick])
        loss = denoising_loss(arena.pipe, images.latents[pick], states, generator, budget.draws)
        (vector.grad,) = torch.autograd.grad(loss, [vector])
        optimizer.step()
        losses.append(loss.item())
    learned = time.perf_counter()
    items = [(c, c.template.replace(SLOT, "<learned>"), {}) for c in contexts]
    attempts, generated = _judge_vector(arena, placeholder, vector.detach(), items)
    start, _ = _judge_vector(arena, placeholder, placeholder.start, items)
    seconds = {
        "search": learned - started,
        "evaluate": time.perf_counter() - learned,
        "total": time.perf_counter() - started,
    }
    result = AttackResult("inversion", "embedding", asdict(budget), attempts, seconds, generated)
    window = max(1, len(losses) // 10)
    start_success = [x for a in start for x in a.success]
    result.details = {
        "asr_start": sum(start_success) / len(start_success),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "vector_norm": vector.norm().item(),
        "token_norm_mean": float(
            arena.pipe.text_encoder.get_input_embeddings().weight.norm(dim=-1).mean()
        ),
        "concept_images": len(images.latents),
        "concept_images_judged_out": images.judged_out,
    }
    return result


def _judge_vector(arena: Arena, placeholder: _Placeholder, vector: torch.Tensor, items: list):
    """Each context's prompt around `vector`, generated for every seed and judged."""
    with torch.no_grad():
        states = placeholder.states(vector, torch.arange(len(items)))
        images = arena.local.images_from_states(states, arena.sampling.seeds)
    return arena.attempts(items, images), images
