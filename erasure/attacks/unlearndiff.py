"""An UnlearnDiffAtk-style attack: a few prompt tokens optimised, white-box, through the
PATCHED model's own denoising loss on images of the concept.

Per context: the base model's images of the concept prompt (their latents z; `per_context`
drawn, the recognised kept), and the prompt itself with `prefix` attack tokens in front. The
tokens are relaxed to a point on the probability simplex over the attack vocabulary per
position (their embedding is the weighted mix of token embeddings); AdamW minimises
||eps - eps_theta*(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, E*(prompt))||^2 over sampled t
and eps (theta*, E*: the patched U-Net and text encoder; the draws are shared out over the
images, so more images cost no more U-Net calls), each step followed by a projection back
onto the simplex. The argmax tokens are decoded to text, put in front of the prompt, and
that text is generated and judged. The argmax tokens are scored whenever they change (the
same draws for every candidate) and the lowest-loss ones are kept; `restarts` independent
starts per context, the lowest loss of them kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from erasure.attacks.arena import Arena, denoising_loss
from erasure.attacks.results import AttackResult
from erasure.attacks.tokens import Vocabulary, as_text, layout, single_encoder, token_embeddings

CHECK_DRAWS = 16  # (t, eps) draws scoring each argmax candidate


@dataclass(frozen=True)
class UnlearnDiffBudget:
    prefix: int = 5  # k attack tokens
    steps: int = 40  # optimiser steps per attempt
    # Published 0.01. On MiniCanvas no argmax token changed in 40 steps at 0.01 (base ASR
    # 25%, the random start's); 0.1 moved 2-5 of 5 and reached 87.5% on the base.
    lr: float = 0.1
    weight_decay: float = 0.1
    draws: int = 4  # sampled (t, eps) per step
    # Starts per context, the lowest loss kept. The loss landscape over tokens is rough: on
    # the MiniCanvas base (circle, 8 contexts) 1 start reached the concept in 11 of 16
    # images, 3 starts in 14 of 16 (calibration needs >= 80%).
    restarts: int = 3
    contexts: int = 4  # contexts attacked (0: all)
    # Starts' prefixes per context (lowest loss first) the attacker tries with the judge
    # before sending one (Arena.probe; 1: send the lowest-loss prefix unchecked).
    probes: int = 3
    # Images per candidate in that check (seeds 9000, 9001, ...): the most recognised wins.
    probe_seeds: int = 4
    # Base images of the concept per context the prefix is fitted to (seeds 7000, ...; the
    # judge's recognised ones). Published: one; a prefix fitted to one drawing can explain
    # that drawing without drawing the concept. On the MiniCanvas base (8 objects, with the
    # probes above) 1 image reached 79.0%, 4 reached 87.5% (81.2% without the probes).
    per_context: int = 4


def per_image(draws: int, images: int) -> int:
    """(t, eps) draws per image so that all images together get about `draws`."""
    return max(1, -(-draws // images))


def project_simplex(weights: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean projection onto the probability simplex."""
    ordered, _ = weights.sort(-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    index = torch.arange(1, weights.shape[-1] + 1, dtype=weights.dtype)
    support = (ordered - cumulative / index) > 0
    count = support.sum(-1, keepdim=True)
    threshold = cumulative.gather(-1, count - 1) / count
    return (weights - threshold).clamp_min(0)


class _Prefix:
    """The differentiable prompt: fixed token embeddings with the prefix slots mixed."""

    def __init__(self, pipe: Any, vocabulary: Vocabulary, prompt: str, prefix: int):
        self.encoder = pipe.text_encoder
        self.ids, self.slots = layout(pipe.tokenizer, "", prefix, prompt)
        table = self.encoder.get_input_embeddings().weight.detach()
        self.table = table[vocabulary.ids]  # [V, width]
        self.fixed = table[self.ids][None]  # [1, context, width]

    def states(self, weights: torch.Tensor) -> torch.Tensor:
        mixed = weights @ self.table
        before, after = self.fixed[:, : self.slots.start], self.fixed[:, self.slots.stop :]
        embeddings = torch.cat([before, mixed[None], after], 1)
        with token_embeddings(self.encoder, embeddings):
            return self.encoder(self.ids[None])[0]


def optimise(
    pipe: Any,
    vocabulary: Vocabulary,
    prompt: str,
    latents: torch.Tensor,
    budget: UnlearnDiffBudget,
    seed: int,
) -> tuple[list[int], float]:
    """(prefix token ids, their loss) for one start against `pipe` as it is (patched), on
    `latents` [n, c, h, w] (images of the concept): the argmax tokens with the lowest loss
    seen during the run, each new argmax scored on the same `CHECK_DRAWS` (t, eps) draws."""
    generator = torch.Generator().manual_seed(seed)
    prefix = _Prefix(pipe, vocabulary, prompt, budget.prefix)
    vocab = len(vocabulary)
    start = torch.randint(vocab, (budget.prefix,), generator=generator)
    weights = torch.nn.functional.one_hot(start, vocab).float().requires_grad_(True)
    optimizer = torch.optim.AdamW([weights], lr=budget.lr, weight_decay=budget.weight_decay)

    images = len(latents)
    draws, check_draws = per_image(budget.draws, images), per_image(CHECK_DRAWS, images)

    def loss_of(states: torch.Tensor, generator: torch.Generator, count: int) -> torch.Tensor:
        return denoising_loss(pipe, latents, states.expand(images, -1, -1), generator, count)

    def discrete_loss(chosen: torch.Tensor) -> float:
        check = torch.Generator().manual_seed(seed + 1)  # the same draws for every candidate
        onehot = torch.nn.functional.one_hot(chosen, vocab).float()
        with torch.no_grad():
            return float(loss_of(prefix.states(onehot), check, check_draws))

    best, best_loss = start, discrete_loss(start)
    scored = {tuple(start.tolist())}
    for _ in range(budget.steps):
        loss = loss_of(prefix.states(weights), generator, draws)
        (grad,) = torch.autograd.grad(loss, [weights])
        weights.grad = grad
        optimizer.step()
        with torch.no_grad():
            weights.copy_(project_simplex(weights))
        chosen = weights.detach().argmax(-1)
        if tuple(chosen.tolist()) not in scored:
            scored.add(tuple(chosen.tolist()))
            candidate = discrete_loss(chosen)
            if candidate < best_loss:
                best, best_loss = chosen, candidate
    return vocabulary.ids[best].tolist(), best_loss


def ranked_prefixes(
    pipe: Any,
    vocabulary: Vocabulary,
    prompt: str,
    latents: torch.Tensor,
    budget: UnlearnDiffBudget,
    seed: int,
) -> list[tuple[list[int], float, int]]:
    """Every start's (prefix token ids, loss, start number), lowest loss first."""
    tries = [
        (*optimise(pipe, vocabulary, prompt, latents, budget, seed + r), r)
        for r in range(budget.restarts)
    ]
    return sorted(tries, key=lambda t: t[1])


def run(arena: Arena, budget: UnlearnDiffBudget) -> AttackResult:
    single_encoder(arena.pipe)
    started = time.perf_counter()
    contexts = arena.concept.first(budget.contexts)
    images = arena.concept_images(contexts, budget.per_context)
    by_context: dict[str, list[int]] = {}
    for i, c in enumerate(images.contexts):
        by_context.setdefault(c.name, []).append(i)
    notes = [
        f"{c.name}: the base drew no recognisable concept image"
        for c in contexts
        if c.name not in by_context
    ]
    ranked = []
    for number, context in enumerate(
        tqdm(contexts, desc="UnlearnDiffAtk", disable=not arena.progress)
    ):
        if context.name not in by_context:
            continue
        latents = images.latents[by_context[context.name]]
        seed = arena.seed + 1000 * number
        tries = ranked_prefixes(arena.pipe, arena.vocabulary, context.prompt, latents, budget, seed)
        losses = [loss for _, loss, _ in sorted(tries, key=lambda t: t[2])]
        options = []
        for ids, loss, start in tries:
            text = as_text(arena.tokenizer, ids)
            extra = {
                "prefix": text.text,
                "loss": loss,
                "start": start,
                "restart_losses": losses,
                "fitted_images": len(latents),
            }
            fields = {"ids": text.ids, "round_trips": text.round_trips, "extra": extra}
            options.append((f"{text.text} {context.prompt}".strip(), fields))
        ranked.append((context, options))
    searched = time.perf_counter()
    items = arena.probe(ranked, budget.probes, budget.probe_seeds)
    attempts, generated = arena.judge_prompts(items)
    seconds = {
        "search": searched - started,
        "evaluate": time.perf_counter() - searched,
        "total": time.perf_counter() - started,
    }
    result = AttackResult(
        "unlearndiff", "hosted", asdict(budget), attempts, seconds, generated, notes
    )
    result.details = {
        "vocabulary": arena.vocabulary.record(),
        "concept_images_judged_out": images.judged_out,
    }
    return result
