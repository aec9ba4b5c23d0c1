"""MiniCanvas words for erasure methods: templates, synonyms, anchors and retain prompts.

Training prompts come from the world's *training* templates only; the held-out evaluation
template never reaches a method. Anchors are the world's neutral classes: an erased object
should become an object-free "pattern", an erased style "plain".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bench.minicanvas.quality import concept_kind
from bench.minicanvas.world import (
    OBJECT_SYNONYMS,
    OBJECTS,
    PATTERN_TEMPLATES,
    PLAIN_TEMPLATES,
    STYLE_SYNONYMS,
    STYLES,
    TRAIN_TEMPLATES,
)
from erasure.prompts import SLOT, ConceptSpec

ANCHORS = {"object": "pattern", "style": "plain"}


def concept_spec(concept: str) -> ConceptSpec:
    kind = concept_kind(concept)
    synonyms = OBJECT_SYNONYMS[concept] if kind == "object" else STYLE_SYNONYMS[concept]
    return ConceptSpec(concept, tuple(synonyms), ANCHORS[kind])


def templates(kind: str) -> tuple[str, ...]:
    """Training captions with the concept's slot open and the other kind filled in."""
    if kind == "object":
        out = [t.format(object=SLOT, style=s) for t in TRAIN_TEMPLATES for s in STYLES]
        return tuple(out + [t.format(object=SLOT) for t in PLAIN_TEMPLATES])
    out = [t.format(object=o, style=SLOT) for t in TRAIN_TEMPLATES for o in OBJECTS]
    return tuple(out + [t.format(style=SLOT) for t in PATTERN_TEMPLATES])


def retain_prompts(erased: set[str]) -> tuple[str, ...]:
    """Training captions of every (object, style) pair that names no erased concept."""
    prompts = [
        t.format(object=o, style=s)
        for t in TRAIN_TEMPLATES
        for o in OBJECTS
        for s in STYLES
        if o not in erased and s not in erased
    ]
    prompts += [t.format(style=s) for t in PATTERN_TEMPLATES for s in STYLES if s not in erased]
    prompts += [t.format(object=o) for t in PLAIN_TEMPLATES for o in OBJECTS if o not in erased]
    return tuple(prompts)


def _single_kind(concepts: list[str]) -> str:
    kinds = {concept_kind(c) for c in concepts}
    if len(kinds) != 1:
        raise ValueError("erase objects and styles in separate patches")
    return kinds.pop()


def _prompt_settings(concepts: list[str], retain: bool) -> dict[str, Any]:
    """What every method's config takes from the world: concepts, kind, templates, retain."""
    kind = _single_kind(concepts)
    return dict(
        concepts=[concept_spec(c) for c in concepts],
        kind=kind,
        templates=templates(kind),
        retain_prompts=retain_prompts(set(concepts)) if retain else (),
    )


def hirm_config(concepts: list[str], variant: str, retain: bool = True, **overrides: Any):
    """A HiRM config for MiniCanvas concepts (all of one kind)."""
    from erasure.hirm import HirmConfig

    # lr 1e-3 (not the CLIP-L default 1e-4): measured on the committed model, circle, 4x4
    # cells x 2 seeds - lr 1e-4 left UA at 41% after 60 steps; 1e-3 gives 100% with IRA at
    # the base's (docs/BENCHMARKS.md).
    settings = dict(lr=1e-3, steps=60, progress=False)
    settings.update(overrides)
    return HirmConfig(variant=variant, **_prompt_settings(concepts, retain), **settings)


def esd_config(
    concepts: list[str],
    mode: str,
    retain: bool = False,
    anchored: bool = True,
    **overrides: Any,
):
    """An ESD config for MiniCanvas concepts (all of one kind).

    `anchored`: the target's reference is the prompt with the concept replaced by its anchor
    (False: the empty prompt, the published ESD)."""
    from erasure.esd import EsdConfig

    # Rank 1, lr 1e-3, 200 steps: of the settings tried (docs/BENCHMARKS.md) the first to
    # reach UA >= 90% with the other objects' IRA within 10 points. `retain` adds the
    # preservation term on the other concepts' captions (the sweep's --esd-retain-weight;
    # weight 10 kept IRA within 2 points of the base's).
    # The whole trajectory (t_range 0-1): what every published table was measured with; the
    # erase command's default is now its first 60% (erasure/esd/config.py).
    settings = dict(steps=200, batch=8, lr=1e-3, rank=1, t_range=(0.0, 1.0), progress=False)
    settings.update(overrides)
    prompt_settings = _prompt_settings(concepts, retain)
    if not anchored:
        prompt_settings["concepts"] = [replace(c, anchor=None) for c in prompt_settings["concepts"]]
    return EsdConfig(mode=mode, **prompt_settings, **settings)


DUMO_VARIANTS = ("full", "no-tlmo", "no-gate", "no-prior")


def dumo_config(concepts: list[str], variant: str = "full", **overrides: Any):
    """A DuMo config for MiniCanvas concepts (all of one kind); the variants are its
    ablations: without TLMO, without the prompt gate, without prior-knowledge init.

    The retain captions are split as the CLI splits its default set: every fifth held out,
    for TLMO's fit and the report's drift."""
    from erasure.dumo import DumoConfig

    if variant not in DUMO_VARIANTS:
        raise ValueError(f"DuMo variant {variant!r}: choose one of {', '.join(DUMO_VARIANTS)}")
    settings = _prompt_settings(concepts, retain=True)
    retain = settings.pop("retain_prompts")
    settings.update(
        retain_prompts=tuple(p for i, p in enumerate(retain) if i % 5 != 4),
        check_prompts=tuple(retain[4::5]),
        tlmo=variant != "no-tlmo",
        gate=variant != "no-gate",
        prior=variant != "no-prior",
        progress=False,
    )
    settings.update(overrides)
    return DumoConfig(**settings)
