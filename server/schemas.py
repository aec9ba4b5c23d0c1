"""Request and response shapes of the generation API (OpenAI images API + extensions)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 1000
MAX_IMAGES = 4
MAX_STEPS = 100
MIN_SIDE, MAX_SIDE = 32, 1024
_SIZE = re.compile(r"^(\d{1,4})x(\d{1,4})$")


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`. Fields beyond OpenAI's are documented extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    # Accepted for OpenAI-client compatibility; the server serves exactly one model.
    model: str | None = Field(default=None, max_length=200)
    user: str | None = Field(default=None, max_length=200)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = _SIZE.match(value)
        if not match:
            raise ValueError("size must look like '512x512' (WIDTHxHEIGHT)")
        for side in (int(match[1]), int(match[2])):
            if not MIN_SIDE <= side <= MAX_SIDE or side % 8:
                raise ValueError(
                    f"each side must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}"
                )
        return value

    def dimensions(self, default: int) -> tuple[int, int]:
        if self.size is None:
            return default, default
        width, height = self.size.split("x")
        return int(width), int(height)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    # ConceptGuard's record of what produced the images.
    conceptguard: dict
