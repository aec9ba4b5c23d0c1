"""ESD settings: which concept, which part of the U-Net, LoRA rank, how long."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erasure.prompts import DEFAULT_TEMPLATES, ConceptSpec, PromptError, check_templates

Mode = Literal["x", "u"]

# ESD-x: where text meets image (U-Net cross-attention; Flux's joint attention, both
# streams). ESD-u: the rest of the transformer blocks (U-Net self-attention, feed-forward,
# the blocks' in/out projections; Flux's feed-forward and single-block MLPs).
TARGET_MODULES: dict[str, dict[str, str]] = {
    "unet": {
        "x": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
        "u": r".*(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$",
    },
    "transformer": {
        "x": r".*attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
        "u": r".*(ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.(0\.proj|2)|proj_mlp)$",
    },
}
MODES = ("x", "u")
# Adam's step size falls as 1/width (muP), here the adapted layers' mean input width:
# 1e-3 measured on MiniCanvas (mean width ~100, docs/BENCHMARKS.md); ~1.3e-4 on SD 1.x.
LR_TIMES_WIDTH = 0.1
# The preservation weight measured on MiniCanvas: 10 kept the other objects within a few
# points of the base (1 changed nothing measurable, 30 cost erasure).
RETAIN_WEIGHT = 10.0


@dataclass
class EsdConfig:
    """One ESD run: a LoRA on the U-Net trained with the negative-guidance objective."""

    concepts: list[ConceptSpec]
    mode: Mode = "x"
    kind: Literal["object", "style"] = "object"
    templates: tuple[str, ...] | None = None  # prompts naming the concept ({concept} slot)
    rank: int = 4
    # 400 steps on the first 60% of the trajectory (t_range): the README's one-liner on
    # MiniCanvas's circle went from 81.2% clean erasure (200 steps on all of it) to 100%,
    # IRA 93.8% against the base's 94.6%, in 390 s instead of 300-700 s (docs/ERASURE.md).
    steps: int = 400
    lr: float | None = None  # None: LR_TIMES_WIDTH / the adapted layers' mean input width
    # Negative guidance strength. None: 1 (published) against the empty prompt, 0 against an
    # anchor - the anchored prompt's prediction itself; pushing past it (eta > 0) broke the
    # gradient cells of MiniCanvas's circle (docs/ERASURE.md).
    eta: float | None = None
    batch: int = 8
    sample_steps: int = 25  # DDIM steps of the trajectory x_t is drawn from
    sample_guidance: float = 3.0
    resolution: int | None = None  # pixels; default: the pipeline's own (Flux: 512)
    # The fraction of the trajectory x_t may come from (0: pure noise). Past 60% the image
    # is formed and the concept's and anchor's predictions hardly differ: about half of the
    # steps drawn there had a loss under 1e-3 and taught nothing, at the highest cost.
    t_range: tuple[float, float] = (0.0, 0.6)
    # Beyond the published ESD: keep the base's prediction on unrelated prompts at the same
    # x_t (DuMo's preservation term). Off when empty; MiniCanvas measures what it buys.
    retain_prompts: tuple[str, ...] = ()
    retain_weight: float = RETAIN_WEIGHT
    # Held out of training: the report's per-prompt drift (and the CLI's verdict).
    check_prompts: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolved_eta(self) -> float:
        if self.eta is not None:
            return self.eta
        return 0.0 if any(c.anchor for c in self.concepts) else 1.0

    def resolved_templates(self) -> tuple[str, ...]:
        return check_templates(self.templates or DEFAULT_TEMPLATES[self.kind])

    def check(self) -> None:
        if not self.concepts:
            raise PromptError("name at least one concept to erase")
        if self.mode not in MODES:
            raise PromptError(f"unknown ESD mode {self.mode!r}: choose x or u")
        if (
            self.rank < 1
            or self.steps < 1
            or self.batch < 1
            or (self.lr is not None and self.lr <= 0)
        ):
            raise PromptError("rank, steps and batch must be >= 1 and lr > 0")
        if self.retain_weight < 0:
            raise PromptError("retain weight must be >= 0")
        if any(not p.strip() for p in self.retain_prompts):
            raise PromptError("retain prompts must not be empty")
        low, high = self.t_range
        if not 0.0 <= low < high <= 1.0:
            raise PromptError(f"timestep range {self.t_range} must satisfy 0 <= low < high <= 1")
        self.resolved_templates()
