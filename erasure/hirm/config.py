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
# Adam's step size for hidden matrices falls as 1/width (muP): 1e-3 measured on MiniCanvas's
# 128-wide encoder (docs/BENCHMARKS.md) gives 1.7e-4 for CLIP-L (768; published 5e-5-1e-4).
LR_TIMES_WIDTH = 0.128
# Relative distance to the target (after / before) at which S and V stop: MiniCanvas's tuned
# patches (lr 1e-3, 60 steps) ended at 0.15-0.22 with every concept erased.
GAP_TARGET = 0.2
STEP_BOUNDS = (20, 200)
R_STEPS = 60


@dataclass
class HirmConfig:
    """One HiRM run. Several concepts are trained jointly into one patch per encoder."""

    concepts: list[ConceptSpec]
    variant: Variant = "S"
    kind: Literal["object", "style"] = "object"  # picks the default templates
    templates: tuple[str, ...] | None = None  # with a {concept} slot
    blocks: tuple[int, ...] = (0,)  # trainable text-encoder blocks
    # None: S and V train until the erase gap has closed to GAP_TARGET of its start (between
    # STEP_BOUNDS); R, whose target is never reached, trains R_STEPS.
    steps: int | None = None
    lr: float | None = None  # None: LR_TIMES_WIDTH / the encoder's width
    scale: float | None = None  # c: R default R_SCALE x token norm; S default 1
    eta: float = 1.0  # V: how far along the concept vector to move
    pairs: list[tuple[str, str]] | None = None  # V: explicit (with, without) prompt pairs
    retain_prompts: tuple[str, ...] = ()
    retain_weight: float | None = None  # default RETAIN_WEIGHT[variant]
    # (concept name, prompt, twin): more prompts to erase, each sent where its twin goes
    # (S: the twin's original states) - adversarial prompts found by attacks on an earlier
    # patch, paired with the benign prompt they imitate (erasure/hirm/hardened.py).
    adversarial: tuple[tuple[str, str, str], ...] = ()
    retain_batch: int = 64
    # Held out of training: the report's per-prompt drift (and the CLI's verdict) comes from
    # prompts the patch never saw.
    check_prompts: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the manifest's params

    def resolved_retain_weight(self) -> float:
        return self.retain_weight if self.retain_weight is not None else RETAIN_WEIGHT[self.variant]

    def resolved_lr(self, width: int) -> float:
        return self.lr if self.lr is not None else LR_TIMES_WIDTH / width

    def step_range(self) -> tuple[int, int]:
        """(least, most) steps: equal when fixed; S and V stop between them at GAP_TARGET."""
        if self.steps is not None:
            return self.steps, self.steps
        return (R_STEPS, R_STEPS) if self.variant == "R" else STEP_BOUNDS

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
        unknown = {name for name, _, _ in self.adversarial} - {c.name for c in self.concepts}
        if unknown:
            raise PromptError(f"adversarial prompts for {sorted(unknown)[0]!r}, not a concept here")
        if not self.blocks:
            raise PromptError("train at least one text-encoder block")
        if (self.steps is not None and self.steps < 1) or (self.lr is not None and self.lr <= 0):
            raise PromptError("steps must be >= 1 and lr > 0")
        self.resolved_templates()
