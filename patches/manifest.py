"""The patch manifest: what a patch is, what it was made for, and how to check it."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patches.errors import InvalidManifest
from patches.targets import DENOISER_COMPONENTS, FINGERPRINT_DTYPES, TEXT_COMPONENTS

FORMAT_VERSION = 1
METADATA_KEY = "conceptguard"

Kind = Literal["text_encoder", "unet_lora", "unet_weights", "unet_module"]
# How the tensors combine with the base: replace it, add to it, add the product of low-rank
# factors (patches/lowrank.py), a LoRA pair, an added module.
Mode = Literal["override", "delta", "lowrank", "lora", "module"]

KIND_MODES: dict[str, tuple[str, ...]] = {
    "text_encoder": ("override", "delta", "lowrank"),
    "unet_weights": ("override", "delta", "lowrank"),
    "unet_lora": ("lora",),
    "unet_module": ("module",),
}
KIND_COMPONENTS: dict[str, tuple[str, ...]] = {
    "text_encoder": TEXT_COMPONENTS,
    "unet_weights": DENOISER_COMPONENTS,
    "unet_lora": DENOISER_COMPONENTS,
    "unet_module": ("unet",),
}

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["sd", "sdxl", "flux"]
    component: Literal["text_encoder", "text_encoder_2", "unet", "transformer"]


class Manifest(BaseModel):
    """The JSON document stored in the patch file's `__metadata__`."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    kind: Kind
    mode: Mode
    method: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=128)
    concepts: list[str] = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    target: Target
    # Hash of the ORIGINAL component this patch was made on, per servable dtype.
    base_fingerprint: dict[str, str] = Field(min_length=1)
    created_at: datetime
    conceptguard_version: str = Field(min_length=1, max_length=32)
    content_sha256: str
    eval: dict[str, Any] | None = None

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(
                f"format_version {value} is not supported; this ConceptGuard reads version "
                f"{FORMAT_VERSION}"
            )
        return value

    @field_validator("concepts")
    @classmethod
    def _concepts_non_empty(cls, value: list[str]) -> list[str]:
        if any(not c.strip() or len(c) > 200 for c in value):
            raise ValueError("each concept must be non-empty text of at most 200 characters")
        return value

    @field_validator("base_fingerprint")
    @classmethod
    def _fingerprints(cls, value: dict[str, str]) -> dict[str, str]:
        for dtype, digest in value.items():
            if dtype not in FINGERPRINT_DTYPES:
                raise ValueError(
                    f"fingerprint dtype '{dtype}' is unknown; expected one of "
                    f"{', '.join(FINGERPRINT_DTYPES)}"
                )
            if not _HEX64.match(digest):
                raise ValueError(f"fingerprint for {dtype} is not 64 lowercase hex digits")
        return value

    @field_validator("content_sha256")
    @classmethod
    def _content_hash(cls, value: str) -> str:
        if not _HEX64.match(value):
            raise ValueError("content_sha256 must be 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _kind_is_consistent(self) -> Manifest:
        if self.mode not in KIND_MODES[self.kind]:
            raise ValueError(
                f"mode '{self.mode}' does not fit kind '{self.kind}'; expected "
                f"{' or '.join(KIND_MODES[self.kind])}"
            )
        if self.target.component not in KIND_COMPONENTS[self.kind]:
            raise ValueError(
                f"a {self.kind} patch cannot target '{self.target.component}'; expected "
                f"{' or '.join(KIND_COMPONENTS[self.kind])}"
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Manifest:
        """Validate a decoded manifest, turning pydantic's report into one readable error."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "manifest"
                if err["type"] == "missing":
                    problems.append(f"missing field '{where}'")
                elif err["type"] == "extra_forbidden":
                    problems.append(f"unknown field '{where}'")
                else:
                    problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
            raise InvalidManifest("invalid patch manifest: " + "; ".join(problems)) from None


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)
