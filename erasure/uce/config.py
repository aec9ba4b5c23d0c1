"""UCE settings: the prompts (erasure/closed_form_prompts.py), lambda and the preservation
scale."""

from __future__ import annotations

from dataclasses import dataclass

from erasure.closed_form_prompts import ClosedFormPrompts
from erasure.prompts import PromptError

# The published default: how strongly every other input is held to the original weight.
LAMBDA = 0.1


@dataclass
class UceConfig(ClosedFormPrompts):
    """One UCE edit. Several concepts go into one patch. A concept without an anchor is
    sent to its template with the slot emptied ("a photo of a {concept}" -> "a photo of a")."""

    lam: float = LAMBDA
    preserve_scale: float = 1.0  # weight of the retain prompts' token vectors

    def check(self) -> None:
        super().check()
        if self.lam <= 0 or self.preserve_scale < 0:
            raise PromptError("UCE needs lambda > 0 and a preservation scale >= 0")
