"""Shapes crossing the server's boundaries: the public generation request (OpenAI images API
plus documented extensions), the work item the API process hands to a worker, and the
response record of what produced the images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.config import Limits
from server.errors import InvalidRequest

MAX_SEED = 2**63 - 1
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Not text a model can encode: lone surrogates (JSON's "\ud800" escapes decode to them, and
# they have no UTF-8 form, so the worker's tokenizer fails on them - and with it every row of
# the batch) and control characters other than tab, newline and carriage return. Refused
# here, in the API process, so such a request never reaches a worker.
_NOT_TEXT = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`. Fields beyond OpenAI's are documented extensions.

    Only the shape is checked here; the configured bounds are checked by `parse_request`.
    There is deliberately no `tenant` field: the tenant comes from the API key alone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    # Accepted for OpenAI-client compatibility; the server serves exactly one model.
    model: str | None = Field(default=None, max_length=200)
    user: str | None = Field(default=None, max_length=200)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int | None = None
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    negative_prompt: str | None = None

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str | None) -> str | None:
        if value is not None and not _SIZE.match(value):
            raise ValueError("size must look like '512x512' (WIDTHxHEIGHT)")
        return value

    def dimensions(self, default: int) -> tuple[int, int]:
        if self.size is None:
            return default, default
        width, height = self.size.split("x")
        return int(width), int(height)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _text_problem(field: str, text: str | None) -> list[str]:
    match = _NOT_TEXT.search(text or "")
    if match is None:
        return []
    char = match.group()
    what = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return [
        f"{field}: contains {what} ({char!a} at character {match.start()}), which is not "
        "text a model can encode; send UTF-8 text without control characters"
    ]


def _bound_problems(request: ImageGenerationRequest, limits: Limits, native: int) -> list[str]:
    problems = _text_problem("prompt", request.prompt)
    problems += _text_problem("negative_prompt", request.negative_prompt)
    if not 1 <= len(request.prompt) <= limits.max_prompt_chars:
        problems.append(
            f"prompt: must be 1 to {limits.max_prompt_chars} characters (got {len(request.prompt)})"
        )
    negative = request.negative_prompt
    if negative is not None and len(negative) > limits.max_prompt_chars:
        problems.append(
            f"negative_prompt: must be at most {limits.max_prompt_chars} characters "
            f"(got {len(negative)})"
        )
    if not 1 <= request.n <= limits.max_images:
        problems.append(f"n: must be 1 to {limits.max_images} images per request (got {request.n})")
    if request.steps is not None and not 1 <= request.steps <= limits.max_steps:
        problems.append(f"steps: must be 1 to {limits.max_steps} (got {request.steps})")
    max_side = limits.max_side_for(native)
    if request.size is not None:
        for side in request.dimensions(0):
            if not limits.min_side <= side <= max_side or side % 8:
                problems.append(
                    f"size: each side must be a multiple of 8 between {limits.min_side} and "
                    f"{max_side} (got {request.size}; this model draws {native}x{native})"
                )
                break
    if not problems:
        problems += _work_problems(request, limits, native)
    return problems


def request_work(request: ImageGenerationRequest, limits: Limits, native: int) -> float:
    """A request's work in denoising steps of one image at the model's native size."""
    width, height = request.dimensions(native)
    steps = request.steps or limits.default_steps
    return request.n * steps * width * height / (native * native)


def _work_problems(request: ImageGenerationRequest, limits: Limits, native: int) -> list[str]:
    work = request_work(request, limits, native)
    if work <= limits.max_image_steps:
        return []
    width, height = request.dimensions(native)
    steps = request.steps or limits.default_steps
    return [
        f"work: {request.n} image(s) x {steps} steps at {width}x{height} is {work:g} image-steps "
        f"at this model's native {native}x{native}; a request may ask for at most "
        f"{limits.max_image_steps}: ask for fewer images, fewer steps or a smaller size"
    ]


def parse_request(body: Any, limits: Limits, native: int) -> ImageGenerationRequest:
    """The validated request, or InvalidRequest naming every field that is wrong. `native` is
    the served model's native side in pixels (the default size, and the unit of work)."""
    if isinstance(body, dict) and "tenant" in body:
        raise InvalidRequest(
            "tenant: a request may not name a tenant; the tenant is the one its API key belongs to"
        )
    try:
        request = ImageGenerationRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(_validation_message(exc)) from None
    problems = _bound_problems(request, limits, native)
    if problems:
        raise InvalidRequest("; ".join(problems))
    return request


@dataclass(frozen=True)
class WorkItem:
    """What the API process puts on the worker queue: the request plus facts only the API
    process can establish. `tenant` is set from the authenticated key, never from the body."""

    request_id: str
    tenant: str
    request: ImageGenerationRequest
    seed: int
    enqueued_at: float  # time.time() in the API process, for the queue-wait metric


class GenerationRecord(BaseModel):
    """What produced a response's images: who, with which stack, from which registry state."""

    tenant: str
    patches: list[str]  # the applied stack, patch ids in order
    generation: int  # the registry generation the worker's tenant state was built from
    tenant_generation: int  # the generation at which the tenant's stack last changed
    seed: int
    worker: int
    batch_requests: int
    batch_started_at: float  # unix time the worker began the batch, before its registry check
    timings: dict[str, float]
    denoiser_calls: int = 0  # denoiser forwards the batch made: one per step per shared call


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    conceptguard: GenerationRecord
