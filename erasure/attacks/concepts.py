"""The concept under attack: its words, the templates its concept vector and inversion are
read from, and the contexts an attack is tried in.

A context is one prompt naming the concept (the evaluation prompt) and its benign twin (the
concept replaced by its anchor). On MiniCanvas the contexts are the other kind's classes in
the held-out template ("a drawing of a circle in dots style", one per style) and the
templates are the world's training captions; elsewhere they come from --template flags or
the generic templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from erasure.attacks.tokens import AttackSetupError
from erasure.prompts import SLOT, ConceptSpec, check_templates, fill


@dataclass(frozen=True)
class Context:
    name: str
    prompt: str  # names the concept
    benign: str  # the same prompt with the anchor instead
    template: str  # the prompt with a {concept} slot


@dataclass(frozen=True)
class AttackConcept:
    spec: ConceptSpec
    kind: str  # "object" or "style"
    templates: tuple[str, ...]  # with a {concept} slot: concept vectors
    contexts: tuple[Context, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def first(self, count: int) -> tuple[Context, ...]:
        """`count` contexts spread evenly over the list (0: all): 4 of MiniCanvas's 8 styles
        are stripes, checker, sketch and neon."""
        if not count or count >= len(self.contexts):
            return self.contexts
        step = len(self.contexts) / count
        return tuple(self.contexts[int(i * step)] for i in range(count))

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "synonyms": list(self.spec.synonyms),
            "anchor": self.spec.anchor,
            "templates": len(self.templates),
            "contexts": [c.name for c in self.contexts],
        }


def _contexts(spec: ConceptSpec, named: list[tuple[str, str]]) -> tuple[Context, ...]:
    """(context name, template) pairs -> contexts (the anchor fills the benign twin)."""
    anchor = spec.anchor or ""
    return tuple(
        Context(
            name,
            fill([template], spec.name)[0],
            " ".join(fill([template], anchor)[0].split()),
            template,
        )
        for name, template in named
    )


def is_minicanvas_concept(name: str) -> bool:
    from bench.minicanvas.world import OBJECTS, STYLES

    return name in OBJECTS + STYLES


def minicanvas_concept(name: str) -> AttackConcept:
    """A MiniCanvas object or style with the world's words (erasure_settings.py's synonyms
    and anchors, the training templates) and the held-out template's cells as contexts."""
    from bench.minicanvas.erasure_settings import concept_spec, templates
    from bench.minicanvas.world import HELD_OUT_TEMPLATE, OBJECTS, STYLES

    spec = concept_spec(name)
    kind = "object" if name in OBJECTS else "style"
    if kind == "object":
        named = [(s, HELD_OUT_TEMPLATE.format(object=SLOT, style=s)) for s in STYLES]
    else:
        named = [(o, HELD_OUT_TEMPLATE.format(object=o, style=SLOT)) for o in OBJECTS]
    return AttackConcept(spec, kind, templates(kind), _contexts(spec, named))


def generic_concept(spec: ConceptSpec, kind: str, templates: tuple[str, ...]) -> AttackConcept:
    """Any concept: each template is one context (and the concept vector's templates)."""
    templates = check_templates(templates)
    if spec.anchor is None:
        raise AttackSetupError(
            f"give --anchor for {spec.name!r}: the benign twin of each attack prompt (and the "
            "concept vector's 'without' prompts) put the anchor where the concept was"
        )
    return AttackConcept(
        spec, kind, templates, _contexts(spec, [(f"t{i}", t) for i, t in enumerate(templates)])
    )
