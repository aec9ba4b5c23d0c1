"""DuMo settings: which concept, the eraser's shape, how long each phase trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from erasure.prompts import DEFAULT_TEMPLATES, ConceptSpec, PromptError, check_templates


@dataclass
class DumoConfig:
    """One DuMo run: an eraser on the U-Net's skip connections (patches/skip_eraser.py),
    trained with the frozen U-Net's guidance away from the concept, then its time-layer
    modulation (TLMO) fitted on held-out prompts."""

    concepts: list[ConceptSpec]
    kind: Literal["object", "style"] = "object"
    templates: tuple[str, ...] | None = None  # prompts naming the concept ({concept} slot)
    # The eraser: its width (1 = a full copy of the down path and mid block), TLMO's
    # timestep buckets, the prompt gate, and where it starts from (False: random init,
    # for the ablation of DuMo's prior knowledge).
    width: float = 1.0
    buckets: int = 20
    gate: bool = True
    gate_tokens: int = 256  # at most this many concept token states (fewer if found)
    # The gate's contrast: at most this many token states of the retain prompts, and as
    # many of their padding states, so a position as close to other prompts as to the
    # concept opens nothing (0: the plain gate). Without it "a plain square" scored above
    # "dots cross" for cross on MiniCanvas; without the padding, "a plain cross" above "a
    # crescent in dots style" for dots.
    gate_contrast_tokens: int = 1024
    prior: bool = True
    # Phase 1, the eraser: guidance from each prompt's anchored twin r,
    #   target = eps0(x_t, r) - eta (eps0(x_t, c) - eps0(x_t, r)),
    # plus `retain_weight` x the change of the prediction on retain prompts. eta = 0 (the
    # anchor's own prediction) draws the anchor's image; on MiniCanvas eta = 1 pushed past
    # it and lost the style of 1 in 4 erased cells (circle: clean erasure 62.5% vs 100%).
    steps: int = 150
    lr: float = 1e-4
    batch: int = 8
    eta: float = 0.0
    retain_prompts: tuple[str, ...] = ()
    retain_weight: float = 10.0
    # The share of each batch whose x_t comes from the anchored twin's trajectory instead
    # of the concept's: states on the anchor's own path, where the target keeps the
    # anchor's texture. Against erased pale-style cells flatter than the anchor's images:
    # over three training seeds of star, cross and circle on MiniCanvas, 0.5 gave 90.3%
    # clean erasure and 6 near-white frames against 88.9% and 13 at 0 (BENCHMARKS.md).
    anchor_share: float = 0.5
    # Phase 2, TLMO: the table alone, the same loss on held-out prompts (check_prompts for
    # the retain side), so it learns where in time and depth the eraser is needed.
    tlmo: bool = True
    tlmo_steps: int = 60
    tlmo_lr: float = 0.05
    check_prompts: tuple[str, ...] = ()
    sample_steps: int = 25  # DDIM steps of the trajectory x_t is drawn from
    sample_guidance: float = 3.0
    resolution: int | None = None
    t_range: tuple[float, float] = (0.0, 1.0)
    checkpoint: Path | None = None  # resume from / save to (safetensors + JSON)
    checkpoint_every: int = 25
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
        missing = [c.name for c in self.concepts if not c.anchor]
        if missing:
            raise PromptError(
                f"DuMo needs an --anchor for {', '.join(missing)}: what the concept's prompts "
                "should show instead (e.g. its super-category, or 'pattern' on MiniCanvas)"
            )
        if not 0 < self.width <= 1:
            raise PromptError(f"--width must be in (0, 1], not {self.width}")
        if not 0.0 <= self.anchor_share <= 1.0:
            raise PromptError(f"anchor share must be in [0, 1], not {self.anchor_share}")
        if self.gate_contrast_tokens < 0:
            raise PromptError("gate contrast tokens must be >= 0")
        if min(self.steps, self.batch, self.buckets, self.gate_tokens) < 1 or self.lr <= 0:
            raise PromptError("steps, batch, buckets and gate tokens must be >= 1, lr > 0")
        if self.tlmo_steps < 0 or self.tlmo_lr <= 0 or self.retain_weight < 0:
            raise PromptError("TLMO steps and retain weight must be >= 0, TLMO lr > 0")
        low, high = self.t_range
        if not 0.0 <= low < high <= 1.0:
            raise PromptError(f"timestep range {self.t_range} must satisfy 0 <= low < high <= 1")
        self.resolved_templates()
