"""Which text encoders a pipeline has, and the token states its denoiser actually reads.

HiRM puts its loss on these states, so they must be the ones the pipeline consumes:
- SD 1.x/2.x: `last_hidden_state` (after the final layer norm) of its one CLIP encoder;
- SDXL: the penultimate block's output of both encoders (diffusers' default, clip_skip=None);
- Flux: its CLIP-L `last_hidden_state` (the pipeline keeps the pooled end token); T5 is not
  edited by text-encoder patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from patches.targets import pipeline_family

Layer = Literal["last", "penultimate"]


@dataclass(frozen=True)
class EncoderSlot:
    component: str  # pipeline attribute of the encoder, also the patch target
    tokenizer: str  # pipeline attribute of its tokenizer
    layer: Layer


def encoder_slots(pipe: Any) -> list[EncoderSlot]:
    family = pipeline_family(pipe)
    if family == "sdxl":
        return [
            EncoderSlot("text_encoder", "tokenizer", "penultimate"),
            EncoderSlot("text_encoder_2", "tokenizer_2", "penultimate"),
        ]
    return [EncoderSlot("text_encoder", "tokenizer", "last")]


def token_ids(tokenizer: Any, prompts: list[str], device: str | torch.device) -> torch.Tensor:
    """Padded to the tokenizer's full length, exactly as the diffusers pipelines do."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def read_states(encoder: torch.nn.Module, ids: torch.Tensor, layer: Layer) -> torch.Tensor:
    """[batch, tokens, width] states the denoiser would receive for `ids`."""
    if layer == "penultimate":
        return encoder(ids, output_hidden_states=True).hidden_states[-2]
    return encoder(ids)[0]


@torch.no_grad()
def read_states_batched(
    encoder: torch.nn.Module, ids: torch.Tensor, layer: Layer, batch: int = 256
) -> torch.Tensor:
    return torch.cat(
        [read_states(encoder, ids[i : i + batch], layer) for i in range(0, len(ids), batch)]
    )
