"""Prompt expansion for erasure methods: the prompts that name a concept, and their twins.

A method is trained on a handful of prompts per concept. They come from templates (with a
`{concept}` slot) filled with the concept and its synonyms; the semantic variant needs the
same prompts with the concept replaced by an anchor (its super-category), and the
concept-vector variant needs pairs with and without the concept. Nothing here knows about a
particular model: callers pass their own templates, synonyms and anchors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from patches.errors import ConceptGuardError

SLOT = "{concept}"

# Generic templates for real SD/Flux text encoders (CLIP vocabulary), by kind of concept.
DEFAULT_TEMPLATES = {
    "object": (
        "{concept}",
        "a {concept}",
        "a photo of a {concept}",
        "an image of a {concept}",
        "a painting of a {concept}",
        "a drawing of a {concept}",
        "a close-up photo of the {concept}",
        "a {concept} in a scene",
    ),
    "style": (
        "{concept}",
        "{concept} style",
        "a painting in the style of {concept}",
        "an artwork by {concept}",
        "a landscape in the style of {concept}",
        "a portrait in the style of {concept}",
        "a city street, {concept} style",
        "a still life by {concept}",
    ),
}


class PromptError(ConceptGuardError):
    """The concept/template/anchor settings cannot produce training prompts."""

    http_status = 422


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to erase: its name, other words for it and where it should go instead."""

    name: str
    synonyms: tuple[str, ...] = ()
    anchor: str | None = None  # super-category (HiRM-S), e.g. "cat" -> "animal"

    @property
    def words(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


@dataclass(frozen=True)
class PromptSet:
    """Training prompts for one concept, index-aligned twins included."""

    concept: ConceptSpec
    prompts: tuple[str, ...]  # name the concept (or a synonym)
    anchored: tuple[str, ...] = field(default=())  # same prompts, concept -> anchor


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if not templates:
        raise PromptError("at least one prompt template is needed")
    bad = [t for t in templates if t.count(SLOT) != 1]
    if bad:
        raise PromptError(f"each template needs exactly one {SLOT} slot; {bad[0]!r} does not")
    return tuple(templates)


def fill(templates: Iterable[str], word: str) -> list[str]:
    return [t.replace(SLOT, word) for t in templates]


def expand(concept: ConceptSpec, templates: Sequence[str]) -> PromptSet:
    """Every template with every word for the concept; anchored twins when an anchor is set."""
    templates = check_templates(templates)
    prompts = [p for word in concept.words for p in fill(templates, word)]
    anchored: list[str] = []
    if concept.anchor is not None:
        anchored = [p for _ in concept.words for p in fill(templates, concept.anchor)]
    return PromptSet(concept, tuple(prompts), tuple(anchored))


def pairs(concept: ConceptSpec, templates: Sequence[str]) -> list[tuple[str, str]]:
    """(with concept, without concept) prompt pairs for an empirical concept vector.

    "Without" is the anchor when there is one, else the template with its slot removed
    ("a photo of a {concept}" -> "a photo of a"), which keeps the rest of the prompt aligned.
    """
    templates = check_templates(templates)
    replacement = concept.anchor if concept.anchor is not None else ""
    out = []
    for word in concept.words:
        for template in templates:
            without = " ".join(template.replace(SLOT, replacement).split())
            if without:
                out.append((template.replace(SLOT, word), without))
    if not out:
        raise PromptError(f"no prompt pair for {concept.name!r}: every template is the bare slot")
    return out


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line; blank lines and '#' comments skipped."""
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PromptError(f"{path} holds no prompts (one per line, '#' starts a comment)")
    return prompts


def read_pair_file(path: str) -> list[tuple[str, str]]:
    """Tab-separated `with<TAB>without` prompt pairs, one per line."""
    out = []
    for number, line in enumerate(read_prompt_file(path), 1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise PromptError(
                f"{path}: line {number} must be 'prompt with concept<TAB>prompt without'"
            )
        out.append((parts[0].strip(), parts[1].strip()))
    return out
