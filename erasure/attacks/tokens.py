"""The token space of text attacks: the tokens a tenant can send as text, the text a token
sequence becomes, and token states computed from embeddings chosen by the attack.

A hosted tenant sends text, never token ids or embeddings, so a token sequence found by a
search only counts as the text it decodes to; `as_text` says whether the tokenizer gives the
same tokens back (the round trip), and evaluation always goes through that text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from erasure.text_readout import encoder_slots
from patches.errors import ConceptGuardError

WORD_END = "</w>"  # CLIP's BPE marks the last piece of a word this way


class AttackSetupError(ConceptGuardError):
    """The attack cannot run on this model or with these settings."""


def single_encoder(pipe: Any) -> None:
    """White-box attacks here read one CLIP encoder's last states (SD 1.x/2.x pipelines)."""
    slots = encoder_slots(pipe)
    if len(slots) != 1 or slots[0].layer != "last" or not hasattr(pipe, "unet"):
        raise AttackSetupError(
            f"{type(pipe).__name__}: token-space and white-box attacks support pipelines with "
            "one CLIP text encoder and a U-Net (SD 1.x/2.x); run the paraphrase attack only"
        )


@dataclass(frozen=True)
class Vocabulary:
    """The token ids a search may use."""

    ids: torch.Tensor  # [V] candidate token ids
    banned: tuple[str, ...]  # words left out (the concept's own words)
    words_only: bool

    def __len__(self) -> int:
        return len(self.ids)

    def record(self) -> dict[str, Any]:
        return {"size": len(self), "banned": list(self.banned), "words_only": self.words_only}


def attack_vocabulary(tokenizer: Any, banned: Iterable[str], words_only: bool = True) -> Vocabulary:
    """Tokens a search may pick: no special tokens, none spelling a banned word, and (with
    `words_only`) only whole-word tokens that the tokenizer makes of that word as text, so
    that sequences of them survive being sent as text."""
    banned_words = tuple(sorted({w.lower() for phrase in banned for w in phrase.split()}))
    special = set(tokenizer.all_special_ids)
    keep = []
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if index in special:
            continue
        word = token.removesuffix(WORD_END)
        if word.lower() in banned_words:
            continue
        if words_only:
            if not token.endswith(WORD_END) or not word.strip():
                continue
            if tokenizer(word, add_special_tokens=False).input_ids != [index]:
                continue
        keep.append(index)
    if not keep:
        raise AttackSetupError("no token is left for the search once the banned words are out")
    return Vocabulary(torch.tensor(keep), banned_words, words_only)


@dataclass(frozen=True)
class TokenText:
    """A token sequence as the text a tenant would send."""

    text: str
    ids: list[int]
    round_trips: bool  # the tokenizer turns `text` back into exactly `ids`


def as_text(tokenizer: Any, ids: Iterable[int]) -> TokenText:
    ids = [int(i) for i in ids]
    text = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())
    again = tokenizer(text, add_special_tokens=False).input_ids
    return TokenText(text, ids, again == ids)


def prompt_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """[n, context] ids padded as the diffusers pipelines pad them."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def sequence_ids(tokenizer: Any, body: torch.Tensor) -> torch.Tensor:
    """[n, context] ids: start token, the [n, k] `body`, end token, padding."""
    n, k = body.shape
    context = tokenizer.model_max_length
    if k + 2 > context:
        raise AttackSetupError(f"{k} tokens do not fit this encoder's context of {context}")
    ids = torch.full((n, context), tokenizer.pad_token_id, dtype=torch.long)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1 : k + 1] = body
    ids[:, k + 1] = tokenizer.eos_token_id
    return ids


@contextlib.contextmanager
def token_embeddings(encoder: torch.nn.Module, embeddings: torch.Tensor) -> Iterator[None]:
    """Inside the block, the encoder's token-embedding lookup returns `embeddings`
    ([batch, context, width]) instead: how an attack feeds soft tokens or a learned embedding
    through the stock forward (positions, causal mask and end-token pooling unchanged)."""
    layer = encoder.get_input_embeddings()
    handle = layer.register_forward_hook(lambda module, args, output: embeddings)
    try:
        yield
    finally:
        handle.remove()


def states(encoder: torch.nn.Module, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Last-layer token states (what an SD U-Net reads) of `ids`, in batches, no gradient."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return torch.cat(
            [encoder(ids[i : i + batch].to(device))[0] for i in range(0, len(ids), batch)]
        )


def layout(tokenizer: Any, before: str, slots: int, after: str) -> tuple[torch.Tensor, slice]:
    """([context] ids, the slots' positions): start token, `before`'s tokens, `slots`
    placeholder positions (their embeddings are the attack's), `after`'s tokens, end token,
    padding; cut to the context as the pipelines' tokenizer cuts a prompt."""
    first = tokenizer(before, add_special_tokens=False).input_ids if before.strip() else []
    last = tokenizer(after, add_special_tokens=False).input_ids if after.strip() else []
    context = tokenizer.model_max_length
    body = (first + [tokenizer.pad_token_id] * slots + last)[: context - 2]
    if len(first) + slots > len(body):
        raise AttackSetupError(f"{slots} attack tokens do not fit after {before!r}")
    ids = sequence_ids(tokenizer, torch.tensor([body]))[0]
    return ids, slice(1 + len(first), 1 + len(first) + slots)
