"""ESD settings: which concept, which part of the U-Net, LoRA rank, how long."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erasure.prompts import DEFAULT_TEMPLATES, ConceptSpec, PromptError, check_templates

Mode = Literal["x", "u"]

# ESD-x: cross-attention only (styles, objects). ESD-u: everything else in the transformer
# blocks (nudity): self-attention, feed-forward, the blocks' input/output projections.
CROSS_ATTENTION = r".*attn2\.(to_q|to_k|to_v|to_out\.0)$"
NON_CROSS_ATTENTION = (
    r".*(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$"
)
TARGET_MODULES: dict[str, str] = {"x": CROSS_ATTENTION, "u": NON_CROSS_ATTENTION}


@dataclass
class EsdConfig:
    """One ESD run: a LoRA on the U-Net trained with the negative-guidance objective."""

    concepts: list[ConceptSpec]
    mode: Mode = "x"
    kind: Literal["object", "style"] = "object"
    templates: tuple[str, ...] | None = None  # prompts naming the concept ({concept} slot)
    rank: int = 4
    steps: int = 200
    lr: float = 1e-3
    eta: float = 1.0  # negative guidance strength
    batch: int = 8
    sample_steps: int = 25  # DDIM steps of the trajectory x_t is drawn from
    sample_guidance: float = 3.0
    t_range: tuple[float, float] = (0.0, 1.0)  # fraction of the trajectory x_t may come from
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolved_templates(self) -> tuple[str, ...]:
        return check_templates(self.templates or DEFAULT_TEMPLATES[self.kind])

    def check(self) -> None:
        if not self.concepts:
            raise PromptError("name at least one concept to erase")
        if self.mode not in TARGET_MODULES:
            raise PromptError(f"unknown ESD mode {self.mode!r}: choose x or u")
        if self.rank < 1 or self.steps < 1 or self.lr <= 0 or self.batch < 1:
            raise PromptError("rank, steps and batch must be >= 1 and lr > 0")
        low, high = self.t_range
        if not 0.0 <= low < high <= 1.0:
            raise PromptError(f"timestep range {self.t_range} must satisfy 0 <= low < high <= 1")
        self.resolved_templates()
