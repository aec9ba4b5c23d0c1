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


OutputFormat = Literal["png", "jpeg", "webp"]
# OpenAI fields with no meaning for this server's models: accepted so that OpenAI clients
# work unchanged, and listed in the response's `conceptguard.ignored` so nobody believes
# they took effect (docs/API.md).
IGNORED_FIELDS = ("quality", "style", "moderation", "partial_images")
_IGNORED = "Accepted for OpenAI clients; no effect here (listed in conceptguard.ignored)"
# Fields whose null means "the default", as OpenAI's API and clients treat them.
_NULL_MEANS_DEFAULT = ("n", "response_format", "output_format")


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's images API plus documented extensions (`seed`,
    `steps`, `guidance_scale`, `negative_prompt`).

    Only the shape is checked here; the configured bounds are checked by `parse_request`.
    There is deliberately no `tenant` field: the tenant comes from the API key alone.
    """

    # Strict: "2" is not a number of images (a client bug is refused, never guessed).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str = Field(description="What to draw (bounded by limits.max_prompt_chars)")
    # Never None once validated (null means the default), so the schema says what is sent.
    n: int | None = Field(default=1, description="Images to generate (limits.max_images)")
    size: str | None = Field(
        default=None,
        description="WIDTHxHEIGHT, each side a multiple of 8 within the limits, or 'auto' "
        "(like no size): the model's native size",
    )
    response_format: Literal["b64_json"] | None = Field(
        default="b64_json", description="Images are returned inline, base64-encoded"
    )
    output_format: OutputFormat | None = Field(
        default="png", description="png (lossless, the default), jpeg or webp"
    )
    output_compression: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="JPEG/WebP quality in percent (100, the default, compresses least); "
        "ignored (and reported) for png",
    )
    background: Literal["auto", "opaque"] | None = Field(
        default=None, description="The images are opaque: 'transparent' is refused"
    )
    stream: Literal[False] | None = Field(
        default=None, description="Whole images only: stream=true is refused"
    )
    quality: str | None = Field(default=None, max_length=32, description=_IGNORED)
    style: str | None = Field(default=None, max_length=32, description=_IGNORED)
    moderation: str | None = Field(default=None, max_length=32, description=_IGNORED)
    partial_images: int | None = Field(default=None, ge=0, le=3, description=_IGNORED)
    model: str | None = Field(
        default=None, max_length=200, description="Accepted; the server serves one model"
    )
    user: str | None = Field(default=None, max_length=200, description="Accepted, unused")
    safety_identifier: str | None = Field(
        default=None, max_length=200, description="Accepted, unused"
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Extension: image j uses seed + j (default: random, recorded)",
    )
    steps: int | None = Field(
        default=None, description="Extension: denoising steps (limits.default_steps)"
    )
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=30.0, description="Extension (limits.default_guidance_scale)"
    )
    negative_prompt: str | None = Field(default=None, description="Extension: what to avoid")

    @field_validator(*_NULL_MEANS_DEFAULT, mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and not _SIZE.match(value):
            raise ValueError("size must look like '512x512' (WIDTHxHEIGHT) or be 'auto'")
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _whole_images_only(cls, value: Any) -> Any:
        if value is True:
            raise ValueError(
                "streamed partial images are not supported; send stream=false (or leave it out)"
            )
        return value

    @field_validator("background", mode="before")
    @classmethod
    def _opaque_only(cls, value: Any) -> Any:
        if value == "transparent":
            raise ValueError("this server's models draw opaque images; ask for 'opaque' or 'auto'")
        return value

    def dimensions(self, default: int) -> tuple[int, int]:
        """(width, height); no size and "auto" are the model's native `default` side."""
        if self.size is None or self.size == "auto":
            return default, default
        width, height = self.size.split("x")
        return int(width), int(height)

    def ignored(self) -> dict[str, Any]:
        """The fields given that have no effect here (recorded in the response)."""
        ignored = {name: getattr(self, name) for name in IGNORED_FIELDS}
        if self.output_format == "png":
            ignored["output_compression"] = self.output_compression
        return {name: value for name, value in ignored.items() if value is not None}


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
    if request.size not in (None, "auto"):
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
    # Request fields accepted for OpenAI compatibility that had no effect (set by the API
    # process): {"quality": "hd", ...}.
    ignored: dict[str, Any] = Field(default_factory=dict)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """`POST /v1/images/generations`' answer: OpenAI's images response (`created`, `data`,
    `output_format`, `size`, `background`) plus `conceptguard`, what produced the images."""

    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str  # WIDTHxHEIGHT of the images
    background: Literal["opaque"] = "opaque"
    conceptguard: GenerationRecord
