"""HiRM settings: what to erase, which variant, which blocks, how long."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erasure.prompts import DEFAULT_TEMPLATES, ConceptSpec, PromptError, check_templates

Variant = Literal["R", "S", "V"]
VARIANTS: tuple[Variant, ...] = ("R", "S", "V")

# R: c = R_SCALE x the mean norm of the base's token states. The published c = 500 for
# CLIP-L is about 20x its post-layer-norm token norms; a relative c carries over to any width.
R_SCALE = 20.0
# Retain weights measured on MiniCanvas (docs/BENCHMARKS.md): R's erase term is ~R_SCALE^2
# larger than S's and V's at the start, so it needs a heavier retain term to keep the rest.
RETAIN_WEIGHT = {"R": 50.0, "S": 20.0, "V": 20.0}


@dataclass
class HirmConfig:
    """One HiRM run. Several concepts are trained jointly into one patch per encoder."""

    concepts: list[ConceptSpec]
    variant: Variant = "S"
    kind: Literal["object", "style"] = "object"  # picks the default templates
    templates: tuple[str, ...] | None = None  # with a {concept} slot
    blocks: tuple[int, ...] = (0,)  # trainable text-encoder blocks
    steps: int = 60
    lr: float = 1e-4
    scale: float | None = None  # c: R default R_SCALE x token norm; S default 1
    eta: float = 1.0  # V: how far along the concept vector to move
    pairs: list[tuple[str, str]] | None = None  # V: explicit (with, without) prompt pairs
    retain_prompts: tuple[str, ...] = ()
    retain_weight: float | None = None  # default RETAIN_WEIGHT[variant]
    retain_batch: int = 64
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the manifest's params

    def resolved_retain_weight(self) -> float:
        return self.retain_weight if self.retain_weight is not None else RETAIN_WEIGHT[self.variant]

    def resolved_templates(self) -> tuple[str, ...]:
        return check_templates(self.templates or DEFAULT_TEMPLATES[self.kind])

    def check(self) -> None:
        if not self.concepts:
            raise PromptError("name at least one concept to erase")
        if self.variant not in VARIANTS:
            raise PromptError(f"unknown HiRM variant {self.variant!r}: choose R, S or V")
        if self.variant == "S":
            missing = [c.name for c in self.concepts if c.anchor is None]
            if missing:
                raise PromptError(
                    f"HiRM-S needs an anchor (super-category) for {missing[0]!r}, "
                    "e.g. --anchor animal for a cat"
                )
        if not self.blocks:
            raise PromptError("train at least one text-encoder block")
        if self.steps < 1 or self.lr <= 0:
            raise PromptError("steps must be >= 1 and lr > 0")
        self.resolved_templates()
