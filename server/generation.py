"""Generating one worker batch: rows of several tenants, one text-encoder forward, one denoiser
call per group of rows that can share it, one VAE decode per group.

Rows share a denoiser call when they agree on everything the pipeline takes as a scalar (size,
steps, guidance scale) and on their U-Net stack (LoRA adapters, activated per group);
text-encoder patches do not split a batch, because they are already folded into the prompt
embeddings. Every image row gets its own generator, seeded from
its request (image j of a request with seed s uses s + j), so an image does not depend on what
it was batched with beyond floating-point rounding (see docs/API.md).

Nothing here raises for a row's sake: a group whose pipeline call fails fails its rows only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from patches.errors import ConceptGuardError
from patches.targets import pipeline_family
from server.config import Limits
from server.errors import GenerationFailed
from server.schemas import WorkItem
from server.text_encoding import PromptEncoder, TextPlan
from server.unet_adapters import UnetAdapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One request of a batch, with the tenant plan its snapshot assigned it."""

    item: WorkItem
    plan: TextPlan | None
    unet_stack: tuple[str, ...] = ()


@dataclass
class BatchResult:
    """Per row: its images, or the error that failed it; plus the batch's stage timings."""

    outputs: list[list[Any] | ConceptGuardError]
    timings: dict[str, float] = field(default_factory=dict)


def _denoise_key(row: Row, limits: Limits, native: int) -> tuple:
    request = row.item.request
    guidance = request.guidance_scale
    return (
        request.dimensions(native),
        request.steps or limits.default_steps,
        limits.default_guidance_scale if guidance is None else guidance,
        row.unet_stack,
    )


def _generators(rows: Sequence[Row]) -> list[torch.Generator]:
    # CPU generators give the same noise whatever device the model runs on.
    return [
        torch.Generator(device="cpu").manual_seed(row.item.seed + j)
        for row in rows
        for j in range(row.item.request.n)
    ]


def native_size(pipe: Any) -> int:
    """The pipeline's default image side in pixels (what it draws with no size given)."""
    if pipeline_family(pipe) == "flux":
        return pipe.default_sample_size * pipe.vae_scale_factor
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def decode_latents(pipe: Any, latents: torch.Tensor, width: int, height: int) -> list[Any]:
    """PIL images from latents, exactly as the family's pipeline finishes a call."""
    vae = pipe.vae
    with torch.no_grad():
        if pipeline_family(pipe) == "flux":
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image.detach(), output_type="pil")


def _repeat_rows(tensors: dict[str, torch.Tensor], rows: Sequence[int], counts: Sequence[int]):
    index = torch.tensor([r for r, n in zip(rows, counts, strict=True) for _ in range(n)])
    return {
        k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in tensors.items()
    }


def generate_batch(
    pipe: Any,
    encoder: PromptEncoder,
    rows: Sequence[Row],
    limits: Limits,
    adapters: UnetAdapters | None = None,
) -> BatchResult:
    """Images for every row (a list per row, in request order) or the row's error."""
    result = BatchResult(outputs=[GenerationFailed("not generated")] * len(rows))
    if not rows:
        return result
    native = native_size(pipe)
    started = time.perf_counter()
    texts = [r.item.request.prompt for r in rows]
    plans = [r.plan for r in rows]
    if encoder.uses_negative:
        texts += [r.item.request.negative_prompt or "" for r in rows]
        plans += plans
    try:
        embeds = encoder.encode(texts, plans)
    except Exception:
        logger.exception("text encoding failed for a batch of %d requests", len(rows))
        result.outputs = [GenerationFailed("text encoding failed")] * len(rows)
        return result
    result.timings["text_encode"] = time.perf_counter() - started

    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_denoise_key(row, limits, native), []).append(i)
    result.timings["denoise"] = result.timings["decode"] = result.timings["unet_switch"] = 0.0
    for ((width, height), steps, guidance, unet_stack), members in groups.items():
        counts = [rows[i].item.request.n for i in members]
        kwargs = _repeat_rows(embeds, members, counts)
        if guidance > 1.0 and encoder.uses_negative:
            negatives = _repeat_rows(embeds, [len(rows) + i for i in members], counts)
            if encoder.zero_empty_negative:
                # As the stock pipeline does when no negative prompt is given.
                empty = [not rows[i].item.request.negative_prompt for i in members]
                keep = torch.tensor(
                    [e for e, n in zip(empty, counts, strict=True) for _ in range(n)]
                )
                negatives = {
                    k: torch.where(keep.view(-1, *[1] * (v.dim() - 1)).to(v.device), 0, v)
                    for k, v in negatives.items()
                }
            kwargs.update({f"negative_{k}": v for k, v in negatives.items()})
        try:
            if adapters is not None:
                result.timings["unet_switch"] += adapters.activate(unet_stack)
            elif unet_stack:
                raise RuntimeError("a U-Net stack without the worker's adapters")
            started = time.perf_counter()
            latents = pipe(
                **kwargs,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=_generators([rows[i] for i in members]),
                output_type="latent",
            ).images
            result.timings["denoise"] += time.perf_counter() - started
            started = time.perf_counter()
            images = decode_latents(pipe, latents, width, height)
            result.timings["decode"] += time.perf_counter() - started
        except Exception:
            logger.exception("generation failed for %d request(s)", len(members))
            for i in members:
                result.outputs[i] = GenerationFailed(
                    "the pipeline failed while generating this batch; see the server log"
                )
            continue
        offset = 0
        for i, n in zip(members, counts, strict=True):
            result.outputs[i] = images[offset : offset + n]
            offset += n
    return result
