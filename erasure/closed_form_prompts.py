"""What every closed-form method (UCE, ErasePro) is told about prompts: the concepts with their
words and anchors, the templates, the retain set, which token positions to align."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from erasure.prompts import DEFAULT_TEMPLATES, ConceptSpec, PromptError, check_templates
from erasure.token_pairs import POSITION_SETS, TokenPairs, prompt_pairs, token_pairs


@dataclass
class ClosedFormPrompts:
    concepts: list[ConceptSpec]
    kind: Literal["object", "style"] = "object"  # picks the default templates
    templates: tuple[str, ...] | None = None  # with a {concept} slot
    retain_prompts: tuple[str, ...] = ()
    # Held out of the retain set: the verdict's drift is measured on them (erasure/verdict.py).
    check_prompts: tuple[str, ...] = ()
    positions: str = "all"  # erasure/token_pairs.py: span, content or all
    seed: int = 0  # Flux: the latents its inputs are captured at
    device: str = "cpu"
    name: str | None = None
    extra: dict = field(default_factory=dict)  # recorded in the manifest's params

    def resolved_templates(self) -> tuple[str, ...]:
        return check_templates(self.templates or DEFAULT_TEMPLATES[self.kind])

    def prompt_pairs(self) -> tuple[list[str], list[str]]:
        return prompt_pairs(self.concepts, self.resolved_templates())

    def token_pairs(self, tokenizer, length: int | None = None) -> TokenPairs:
        targets, anchors = self.prompt_pairs()
        return token_pairs(tokenizer, targets, anchors, self.positions, length)

    def retain(self) -> list[str]:
        """The retain prompts plus the empty prompt, the unconditional input of
        classifier-free guidance, which every generation reads."""
        return list(dict.fromkeys([*self.retain_prompts, ""]))

    def check(self) -> None:
        if not self.concepts:
            raise PromptError("name at least one concept to erase")
        if self.positions not in POSITION_SETS:
            raise PromptError(f"positions must be one of {', '.join(POSITION_SETS)}")
        self.resolved_templates()

    def record(self) -> dict[str, Any]:
        """The prompt settings as the manifest's params record them."""
        return {
            "positions": self.positions,
            "templates": list(self.resolved_templates()),
            "synonyms": {c.name: list(c.synonyms) for c in self.concepts},
            "anchors": {c.name: c.anchor for c in self.concepts},
            "retain_prompts": len(self.retain_prompts),
            "seed": self.seed,
            **self.extra,
        }
