"""Token-aligned prompt pairs: which token of a concept prompt stands for which token of its
anchored twin ("a plus sign in dots style" <-> "a pattern in dots style").

Closed-form edits (UCE, ErasePro) redirect token vectors: every token vector that carries the
concept must be paired with the anchor prompt's token vector in the same role. A prompt and
its twin share a prefix and a suffix (the template around the slot); between them lie the
concept's tokens and the anchor's. Pairs, from the first differing token on:
- inside the concept span, the j-th concept token <-> the anchor's j-th token (its last one
  when the concept has more tokens than the anchor; the token just before the slot when the
  anchor is empty);
- after the span, token by token: the template's suffix, the end token and the padding, which
  through causal attention all carry the concept too (the denoiser reads every position);
  target position t <-> anchor position t - len(concept span) + len(anchor span), dropped
  when that falls past the sequence.
Tokens before the span are identical in both prompts and are not paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure.prompts import SLOT, ConceptSpec, PromptError, check_templates

# Which positions are paired: the concept span only, the span through the end token, or the
# span through the last padding position.
POSITION_SETS = ("span", "content", "all")


@dataclass(frozen=True)
class TokenPairs:
    """Prompt pairs, tokenised and padded as the pipeline does, with their aligned positions."""

    target_ids: torch.Tensor  # [prompts, length]
    anchor_ids: torch.Tensor  # [prompts, length]
    # One row per aligned token pair: (prompt index, target position, anchor position).
    index: torch.Tensor  # [pairs, 3], long

    def __len__(self) -> int:
        return len(self.index)

    def to(self, device: torch.device | str) -> TokenPairs:
        return TokenPairs(
            self.target_ids.to(device), self.anchor_ids.to(device), self.index.to(device)
        )

    def gather(
        self, target: torch.Tensor, anchor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token vectors [prompts, length, dim] of both sides -> X, Y [dim, pairs]."""
        prompt, t_pos, a_pos = self.index.unbind(1)
        return target[prompt, t_pos].T, anchor[prompt, a_pos].T


def prompt_pairs(
    concepts: list[ConceptSpec], templates: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """Every template with every word of every concept, and its twin with the concept's anchor
    in the slot (an empty slot when the concept has no anchor: "a photo of a {concept}" ->
    "a photo of a")."""
    templates = check_templates(templates)
    targets, anchors = [], []
    for concept in concepts:
        for word in concept.words:
            for template in templates:
                targets.append(template.replace(SLOT, word))
                anchors.append(" ".join(template.replace(SLOT, concept.anchor or "").split()))
    return targets, anchors


def _length(tokenizer, prompt: str, length: int) -> int:
    """Tokens of `prompt` up to and including its end token (no padding), truncated."""
    return len(tokenizer(prompt, truncation=True, max_length=length).input_ids)


def align(target: list[int], anchor: list[int], t_len: int, a_len: int, positions: str):
    """Aligned (target position, anchor position) pairs of one padded prompt pair."""
    width = len(target)
    shortest = min(t_len, a_len)
    prefix = 0
    while prefix < shortest and target[prefix] == anchor[prefix]:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and target[t_len - 1 - suffix] == anchor[a_len - 1 - suffix]:
        suffix += 1
    t_end, a_end = t_len - suffix, a_len - suffix
    if prefix == t_end:
        return []  # the prompts are the same up to padding: nothing to redirect
    stop = {"span": t_end, "content": t_len, "all": width}[positions]
    pairs = []
    for pos in range(prefix, stop):
        if pos < t_end:
            other = min(pos, a_end - 1) if a_end > prefix else max(prefix - 1, 0)
        else:
            other = pos - t_end + a_end
        if other < width:
            pairs.append((pos, other))
    return pairs


def token_pairs(
    tokenizer,
    targets: list[str],
    anchors: list[str],
    positions: str = "all",
    length: int | None = None,
) -> TokenPairs:
    """Tokenise the prompt pairs, padded as the pipeline pads them (to `length`, by default
    the tokenizer's full length) and align them (module doc)."""
    if positions not in POSITION_SETS:
        raise PromptError(f"positions must be one of {', '.join(POSITION_SETS)}")
    if len(targets) != len(anchors):
        raise PromptError("every target prompt needs its anchored twin")
    length = length or tokenizer.model_max_length

    def ids(prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    t_ids, a_ids = ids(targets), ids(anchors)
    rows = []
    for i, (t, a) in enumerate(zip(targets, anchors, strict=True)):
        found = align(
            t_ids[i].tolist(),
            a_ids[i].tolist(),
            _length(tokenizer, t, length),
            _length(tokenizer, a, length),
            positions,
        )
        rows += [(i, tp, ap) for tp, ap in found]
    if not rows:
        raise PromptError("the target and anchor prompts do not differ: nothing to align")
    return TokenPairs(t_ids, a_ids, torch.tensor(rows, dtype=torch.long))
