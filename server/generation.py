"""Generating one worker batch: rows of several tenants, one text-encoder forward, one denoiser
call per group of rows that can share it, one VAE decode per group.

Rows share a denoiser call when they agree on everything the pipeline takes as a scalar (size,
steps, guidance scale), whatever their tenants' patches: text-encoder patches are folded
into the prompt embeddings, and denoiser patches are applied per row inside the one call
(server/denoiser_routing.py). Every image row gets its own generator, seeded from
its request (image j of a request with seed s uses s + j), so an image does not depend on what
it was batched with beyond floating-point rounding (see docs/API.md).

Nothing here raises for a row's sake: a group whose pipeline call fails fails its rows only.

`keep_going`, when given, is asked before each group's denoiser call and after every
denoising step whether anybody still waits for the group's rows; when nobody does, the call
is skipped or stopped (diffusers' interrupt flag) and those rows answer RequestCancelled. It
never changes what the rows that are computed get.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from patches.errors import ConceptGuardError
from patches.targets import pipeline_family
from server.config import Limits
from server.denoiser_routing import DenoiserRouter
from server.denoiser_stacks import DenoiserStack
from server.errors import GenerationFailed, InvalidRequest, RequestCancelled
from server.schemas import WorkItem
from server.text_encoding import PromptEncoder, TextPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One request of a batch, with the tenant plan its snapshot assigned it."""

    item: WorkItem
    plan: TextPlan | None
    denoiser: DenoiserStack | None = None


@dataclass
class BatchResult:
    """Per row: its images, or the error that failed it; plus the batch's stage timings."""

    outputs: list[list[Any] | ConceptGuardError]
    timings: dict[str, float] = field(default_factory=dict)
    denoiser_calls: int = 0  # denoiser forwards over all groups: one per step per group
    stopped: int = 0  # rows whose group was skipped or stopped: nobody waited for them


# Asked with a group's work items: whether anybody still waits for any of them.
KeepGoing = Callable[[Sequence[WorkItem]], bool]


class _StopWhenAbandoned:
    """diffusers' per-step callback: stops the denoising loop (its interrupt flag) once
    nobody waits for any row of the call."""

    def __init__(self, keep_going: KeepGoing, items: Sequence[WorkItem]):
        self.keep_going = keep_going
        self.items = items
        self.stopped = False

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if not self.keep_going(self.items):
            pipe._interrupt = True
            self.stopped = True
        return {}


def _denoise_key(row: Row, limits: Limits, native: int) -> tuple:
    request = row.item.request
    guidance = request.guidance_scale
    return (
        request.dimensions(native),
        request.steps or limits.default_steps,
        limits.default_guidance_scale if guidance is None else guidance,
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
        # The pipeline's own denormalisation, left on the device ("pt").
        image = pipe.image_processor.postprocess(image.detach(), output_type="pt")
        return pil_images(image)


def pil_images(image: torch.Tensor) -> list[Any]:
    """PIL images from [B, C, H, W] values in [0, 1], equal to diffusers' "pil" output.

    diffusers copies the float images to the host and rounds there; this rounds on the
    device with the same float32 operations (x 255, round half to even) and copies uint8
    (a quarter of the float32 bytes) into pinned memory, so on a GPU the copy is one DMA."""
    from PIL import Image

    pixels = (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if pixels.device.type == "cuda":
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        torch.cuda.current_stream(pixels.device).synchronize()
    else:
        host = pixels.contiguous()
    array = host.numpy()
    if array.shape[-1] == 1:
        return [Image.fromarray(a.squeeze(-1)) for a in array]  # mode "L"
    return [Image.fromarray(a) for a in array]


def _repeat_rows(tensors: dict[str, torch.Tensor], rows: Sequence[int], counts: Sequence[int]):
    index = torch.tensor([r for r, n in zip(rows, counts, strict=True) for _ in range(n)])
    return {
        k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in tensors.items()
    }


def _encode(encoder: PromptEncoder, rows: Sequence[Row]) -> dict[str, Any]:
    """Embeddings of the rows' prompts, then (with negatives) of their negative prompts."""
    texts = [r.item.request.prompt for r in rows]
    plans = [r.plan for r in rows]
    if encoder.uses_negative:
        texts += [r.item.request.negative_prompt or "" for r in rows]
        plans += plans
    return encoder.encode(texts, plans)


def _encoding_error(exc: Exception) -> ConceptGuardError:
    if isinstance(exc, (UnicodeError, ValueError)):
        return InvalidRequest(f"this request's text could not be encoded: {type(exc).__name__}")
    return GenerationFailed("the text encoder failed on this request; see the server log")


def _encode_isolating(
    encoder: PromptEncoder, rows: Sequence[Row], outputs: list
) -> tuple[dict[str, Any] | None, list[int]]:
    """(embeddings, the rows they are for): every row at once, and when that fails, each row
    alone, so a row whose text cannot be encoded fails only itself (written to `outputs`)."""
    try:
        return _encode(encoder, rows), list(range(len(rows)))
    except Exception:
        logger.warning("text encoding failed for a batch of %d; isolating rows", len(rows))
    live = []
    for i, row in enumerate(rows):
        try:
            _encode(encoder, [row])
        except Exception as exc:
            logger.warning("request %s: its text cannot be encoded: %r", row.item.request_id, exc)
            outputs[i] = _encoding_error(exc)
        else:
            live.append(i)
    if not live:
        return None, []
    try:
        return _encode(encoder, [rows[i] for i in live]), live
    except Exception:
        logger.exception("text encoding failed again for %d requests", len(live))
        for i in live:
            outputs[i] = GenerationFailed("text encoding failed; see the server log")
        return None, []


def _cancel_rows(result: BatchResult, rows: Sequence[int]) -> None:
    for i in rows:
        result.outputs[i] = RequestCancelled("nobody waits for this request any more")
    result.stopped += len(rows)


def generate_batch(
    pipe: Any,
    encoder: PromptEncoder,
    rows: Sequence[Row],
    limits: Limits,
    router: DenoiserRouter,
    keep_going: KeepGoing | None = None,
) -> BatchResult:
    """Images for every row (a list per row, in request order) or the row's error."""
    result = BatchResult(outputs=[GenerationFailed("not generated")] * len(rows))
    if not rows:
        return result
    started = time.perf_counter()
    embeds, live = _encode_isolating(encoder, rows, result.outputs)
    result.timings["text_encode"] = time.perf_counter() - started
    result.timings["denoise"] = result.timings["decode"] = 0.0
    if embeds is None:
        return result
    # From here on, `rows` are the encoded ones; row i answers request `live[i]`.
    rows = [rows[i] for i in live]
    native = native_size(pipe)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_denoise_key(row, limits, native), []).append(i)
    for ((width, height), steps, guidance), members in groups.items():
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
        stacks = [rows[i].denoiser for i, n in zip(members, counts, strict=True) for _ in range(n)]
        watch = None
        if keep_going is not None:
            watch = _StopWhenAbandoned(keep_going, [rows[i].item for i in members])
            if not keep_going(watch.items):
                _cancel_rows(result, [live[i] for i in members])
                continue
            kwargs["callback_on_step_end"] = watch
        try:
            started = time.perf_counter()
            with router.routing(stacks) as passed:
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
            result.denoiser_calls += passed.calls
            if watch is not None and watch.stopped:
                _cancel_rows(result, [live[i] for i in members])
                continue
            started = time.perf_counter()
            images = decode_latents(pipe, latents, width, height)
            result.timings["decode"] += time.perf_counter() - started
        except Exception:
            logger.exception("generation failed for %d request(s)", len(members))
            for i in members:
                result.outputs[live[i]] = GenerationFailed(
                    "the pipeline failed while generating this batch; see the server log"
                )
            continue
        offset = 0
        for i, n in zip(members, counts, strict=True):
            result.outputs[live[i]] = images[offset : offset + n]
            offset += n
    return result
