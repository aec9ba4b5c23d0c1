"""The MiniCanvas quality benchmark: UA / IRA / CRA, generality, drift and the validity gates.

Every generation uses the held-out template, fixed seeds and the same cells for the base and
the patched model, so the base model's own figures stand beside the patched ones. Metrics:
- UA: share of the erased concept's cells whose images the judge does NOT classify as it.
- IRA: accuracy on the other concepts of the same kind, on cells without the erased concept.
- CRA: accuracy on the other kind (styles when an object is erased and vice versa), same cells.
- UA_synonyms / UA_implicit: UA with synonyms / implicit style descriptions in the prompt
  (implicit descriptions exist for styles only; null for objects).
- drift: same-seed pixel MSE (images in [0, 1]) between base and patched on cells without
  the erased concept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.minicanvas.data import render_grid
from bench.minicanvas.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, Request, generate
from bench.minicanvas.world import (
    HELD_OUT_TEMPLATE,
    OBJECT_CLASSES,
    OBJECT_SYNONYMS,
    OBJECTS,
    STYLE_CLASSES,
    STYLE_SYNONYMS,
    STYLES,
    held_out_prompt,
    implicit_prompt,
)

SCHEMA = "conceptguard.minicanvas.quality/1"
GATES = {
    "judge_style": 0.98,
    "judge_object": 0.99,
    "base_style": 0.90,
    "base_object": 0.90,
    "synonyms": 0.80,
    "implicit": 0.80,
}
PATCHED_FIELDS = (
    "UA",
    "IRA",
    "CRA",
    "UA_synonyms",
    "UA_implicit",
    "drift",
    "UA_base",
    "IRA_base",
    "CRA_base",
)
# For a mean/worst block: which direction is worse.
_LOWER_IS_WORSE = {
    "UA",
    "IRA",
    "CRA",
    "UA_synonyms",
    "UA_implicit",
    "UA_base",
    "IRA_base",
    "CRA_base",
}


@dataclass(frozen=True)
class EvalSettings:
    seeds: int = 4
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    objects: tuple[str, ...] = OBJECTS
    styles: tuple[str, ...] = STYLES
    batch: int = 64
    judge_images_per_cell: int = 10
    seed_offset: int = 1000


@dataclass(frozen=True)
class Cell:
    obj: str
    style: str
    seed: int
    prompt: str

    @property
    def labels(self) -> tuple[int, int]:
        return OBJECT_CLASSES.index(self.obj), STYLE_CLASSES.index(self.style)


def concept_kind(concept: str) -> str:
    if concept in OBJECTS:
        return "object"
    if concept in STYLES:
        return "style"
    raise ValueError(
        f"unknown concept {concept!r}: expected one of {', '.join(OBJECTS + STYLES)}, "
        "all-objects or all-styles"
    )


@dataclass
class Judged:
    """Generated images of a cell list and both judges' verdicts."""

    cells: list[Cell]
    images: torch.Tensor
    styles: np.ndarray  # primary judge
    objects: np.ndarray
    agree: np.ndarray  # both judges agree on style and object

    def subset(self, keep: np.ndarray) -> tuple[list[Cell], np.ndarray, np.ndarray]:
        cells = [c for c, k in zip(self.cells, keep, strict=True) if k]
        return cells, self.styles[keep], self.objects[keep]


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


@dataclass
class Evaluator:
    pipe: Any
    judges: list  # primary first
    settings: EvalSettings = field(default_factory=EvalSettings)
    timings: dict[str, float] = field(default_factory=dict)

    def seeds(self) -> list[int]:
        return [self.settings.seed_offset + i for i in range(self.settings.seeds)]

    def grid(self) -> list[Cell]:
        return [
            Cell(o, s, seed, held_out_prompt(o, s))
            for o in self.settings.objects
            for s in self.settings.styles
            for seed in self.seeds()
        ]

    def synonym_cells(self, concept: str | None = None) -> list[tuple[Cell, str]]:
        """(cell, kind of swapped word), optionally only those naming `concept`'s synonyms."""
        out = []
        for o in self.settings.objects:
            for s in self.settings.styles:
                for seed in self.seeds():
                    if concept in (None, o):
                        out += [
                            (
                                Cell(o, s, seed, HELD_OUT_TEMPLATE.format(object=w, style=s)),
                                "object",
                            )
                            for w in OBJECT_SYNONYMS[o]
                        ]
                    if concept in (None, s):
                        out += [
                            (Cell(o, s, seed, HELD_OUT_TEMPLATE.format(object=o, style=w)), "style")
                            for w in STYLE_SYNONYMS[s]
                        ]
        return out

    def implicit_cells(self, style: str | None = None) -> list[Cell]:
        return [
            Cell(o, s, seed, implicit_prompt(o, s))
            for o in self.settings.objects
            for s in self.settings.styles
            if style in (None, s)
            for seed in self.seeds()
        ]

    def judge(self, cells: list[Cell], timing: str) -> Judged:
        started = time.perf_counter()
        requests = [Request(c.prompt, c.seed) for c in cells]
        s = self.settings
        images = generate(self.pipe, requests, s.steps, s.guidance, s.batch)
        verdicts = [j.classify(images) for j in self.judges]
        styles, objects = (v.numpy() for v in verdicts[0])
        agree = np.ones(len(cells), bool)
        for other_styles, other_objects in verdicts[1:]:
            agree &= (other_styles.numpy() == styles) & (other_objects.numpy() == objects)
        self.timings[timing] = self.timings.get(timing, 0.0) + time.perf_counter() - started
        return Judged(cells, images, styles, objects, agree)

    def judge_real_accuracy(self) -> dict[str, dict[str, float]]:
        """Each judge's accuracy on freshly rendered held-out real images (gate 1)."""
        from bench.minicanvas.judge import accuracy

        started = time.perf_counter()
        held_out = render_grid(self.settings.judge_images_per_cell, seed=424242)
        report = {}
        for judge in self.judges:
            style_acc, object_acc = accuracy(judge, held_out)
            report[judge.architecture] = {"style_acc": style_acc, "object_acc": object_acc}
        self.timings["judges_s"] = time.perf_counter() - started
        return report


def accuracies(judged: Judged) -> tuple[float, float]:
    labels = np.array([c.labels for c in judged.cells])
    return float((judged.objects == labels[:, 0]).mean()), float(
        (judged.styles == labels[:, 1]).mean()
    )


def base_block(grid: Judged, synonyms: Judged, synonym_kinds: list[str], implicit: Judged) -> dict:
    object_acc, style_acc = accuracies(grid)
    labels = np.array([c.labels for c in synonyms.cells])
    kinds = np.array(synonym_kinds)
    correct = np.where(
        kinds == "object", synonyms.objects == labels[:, 0], synonyms.styles == labels[:, 1]
    )
    implicit_labels = np.array([c.labels for c in implicit.cells])
    return {
        "style_acc": style_acc,
        "object_acc": object_acc,
        "synonym_acc": float(correct.mean()),
        "implicit_acc": float((implicit.styles == implicit_labels[:, 1]).mean()),
        "judge_agreement": float(grid.agree.mean()),
        "images": len(grid.cells) + len(synonyms.cells) + len(implicit.cells),
    }


def gates(judges: dict[str, dict[str, float]], base: dict) -> dict[str, bool]:
    result = {
        "judge_style": all(j["style_acc"] >= GATES["judge_style"] for j in judges.values()),
        "judge_object": all(j["object_acc"] >= GATES["judge_object"] for j in judges.values()),
        "base_style": base["style_acc"] >= GATES["base_style"],
        "base_object": base["object_acc"] >= GATES["base_object"],
        "synonyms": base["synonym_acc"] >= GATES["synonyms"],
        "implicit": base["implicit_acc"] >= GATES["implicit"],
    }
    result["all"] = all(result.values())
    return result


def _erasure_scores(
    judged: Judged, concept: str, kind: str, erased: frozenset[str] = frozenset()
) -> dict[str, float | None]:
    """UA on `concept`'s cells; IRA and CRA on cells naming none of the erased concepts
    (`erased`: every concept one multi-concept patch erases; `concept` alone by default)."""
    labels = np.array([c.labels for c in judged.cells])
    erased = erased | {concept}
    in_concept = np.array(
        [(c.obj if kind == "object" else c.style) == concept for c in judged.cells]
    )
    concept_index = (OBJECT_CLASSES if kind == "object" else STYLE_CLASSES).index(concept)
    predicted_same = judged.objects if kind == "object" else judged.styles
    predicted_other = judged.styles if kind == "object" else judged.objects
    same_col, other_col = (0, 1) if kind == "object" else (1, 0)
    rest = np.array([(c.obj if kind == "object" else c.style) not in erased for c in judged.cells])
    return {
        "UA": _mean(predicted_same[in_concept] != concept_index),
        "IRA": _mean(predicted_same[rest] == labels[rest, same_col]),
        "CRA": _mean(predicted_other[rest] == labels[rest, other_col]),
    }


def patched_block(
    concept: str,
    base_grid: Judged,
    patched_grid: Judged,
    patched_synonyms: Judged,
    patched_implicit: Judged | None,
    erased: frozenset[str] = frozenset(),
) -> dict:
    kind = concept_kind(concept)
    scores = _erasure_scores(patched_grid, concept, kind, erased)
    base_scores = _erasure_scores(base_grid, concept, kind, erased)
    concept_index = (OBJECT_CLASSES if kind == "object" else STYLE_CLASSES).index(concept)
    syn_pred = patched_synonyms.objects if kind == "object" else patched_synonyms.styles
    implicit = None
    if patched_implicit is not None:
        implicit = _mean(patched_implicit.styles != concept_index)
    erased = erased | {concept}
    rest = np.array(
        [(c.obj if kind == "object" else c.style) not in erased for c in base_grid.cells]
    )
    drift = float(((patched_grid.images[rest] - base_grid.images[rest]) / 2).pow(2).mean())
    return {
        **scores,
        "UA_synonyms": _mean(syn_pred != concept_index),
        "UA_implicit": implicit,
        "drift": drift,
        "UA_base": base_scores["UA"],
        "IRA_base": base_scores["IRA"],
        "CRA_base": base_scores["CRA"],
        "judge_agreement": float(patched_grid.agree.mean()),
    }


def summarise(per_concept: dict[str, dict]) -> tuple[dict, dict]:
    """(mean, worst) over concepts of each patched field (worst: lowest accuracy, most drift)."""
    mean, worst = {}, {}
    for key in PATCHED_FIELDS:
        values = [b[key] for b in per_concept.values() if b.get(key) is not None]
        if not values:
            mean[key] = worst[key] = None
            continue
        mean[key] = float(np.mean(values))
        worst[key] = float(min(values) if key in _LOWER_IS_WORSE else max(values))
    return mean, worst
