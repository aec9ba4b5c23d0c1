"""The control: random token sequences from the attack vocabulary, no search.

A model that draws the concept for meaningless text (MiniCanvas draws some objects more
often than others when the prompt names none) gives every attack that rate for free; the
control measures it on the same contexts, seeds and token space, so a search's ASR can be
read against it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from erasure.attacks.arena import Arena
from erasure.attacks.results import AttackResult
from erasure.attacks.tokens import as_text


@dataclass(frozen=True)
class RandomBudget:
    tokens: int = 16
    samples: int = 2  # random sequences per context
    contexts: int = 4  # (0: all)


def run(arena: Arena, budget: RandomBudget) -> AttackResult:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(arena.seed + 99)
    vocabulary = arena.vocabulary.ids
    items = []
    for context in arena.concept.first(budget.contexts):
        for _ in range(budget.samples):
            pick = torch.randint(len(vocabulary), (budget.tokens,), generator=generator)
            text = as_text(arena.tokenizer, vocabulary[pick].tolist())
            items.append((context, text.text, {"ids": text.ids, "round_trips": text.round_trips}))
    attempts, images = arena.judge_prompts(items)
    seconds = {"total": time.perf_counter() - started}
    return AttackResult("random-tokens", "control", asdict(budget), attempts, seconds, images)
