"""ErasePro settings: the prompts (erasure/closed_form_prompts.py), which chain, and how each
layer's solve is posed."""

from __future__ import annotations

from dataclasses import dataclass

from erasure.closed_form_prompts import ClosedFormPrompts
from erasure.prompts import PromptError

CHAINS = ("text", "unet")
TARGETS = ("stream", "layer")


@dataclass
class EraseProConfig(ClosedFormPrompts):
    """One ErasePro edit; several concepts go into one patch. Every concept needs an anchor:
    the method aligns each target prompt with its anchored twin, token by token."""

    chain: str = "text"  # text: mlp.fc2 of `blocks`; unet: the denoiser's K/V projections
    blocks: tuple[int, ...] = (0, 1, 2)  # text chain, shallow to deep
    target: str = "stream"  # text chain: erasure/erasepro/text_chain.py
    # Minimal change measured in M = I + w * (retain inputs' second moment, normalised).
    # MiniCanvas, 2 seeds, circle/ring/heart: w = 1 kept IRA within 2 points on the text
    # chain but let the U-Net chain lose 8 (circle); w = 100 kept both at the base's with a
    # third of the drift (docs/BENCHMARKS.md).
    preserve_weight: float = 100.0
    # Principal combinations of the aligned tokens kept as exact constraints: singular values
    # above rcond x the largest (erasure/closed_form.py).
    rcond: float = 0.1

    def check(self) -> None:
        super().check()
        missing = [c.name for c in self.concepts if not c.anchor]
        if missing:
            raise PromptError(
                f"ErasePro aligns every prompt with its anchored twin: give --anchor for "
                f"{missing[0]!r} (e.g. its super-category, or a neutral word)"
            )
        if self.chain not in CHAINS:
            raise PromptError(f"unknown chain {self.chain!r}: choose text or unet")
        if self.target not in TARGETS:
            raise PromptError(f"unknown target {self.target!r}: choose stream or layer")
        if self.chain == "text" and not self.blocks:
            raise PromptError("the text chain needs at least one block")
        if self.preserve_weight < 0 or not 0 < self.rcond < 1:
            raise PromptError("the preservation weight must be >= 0 and rcond in (0, 1)")
