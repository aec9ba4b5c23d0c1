"""The MiniCanvas quality benchmark: generation and judging of the evaluation cells, the
base model's figures and the validity gates.

Every generation uses the held-out template, fixed seeds and the same cells for the base and
the patched model, so the base model's own figures stand beside the patched ones. The
erasure scores of a patch (clean-erasure rate, UA, IRA, CRA, generality, degenerate images,
distance to the anchor, drift) are in `erasure_scores.py`.
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
    anchor_prompt,
    held_out_prompt,
    implicit_prompt,
)

SCHEMA = "conceptguard.minicanvas.quality/2"
GATES = {
    "judge_style": 0.98,
    "judge_object": 0.99,
    "base_style": 0.90,
    "base_object": 0.90,
    "synonyms": 0.80,
    "implicit": 0.80,
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


@dataclass
class Evaluator:
    pipe: Any
    judges: list  # primary first
    settings: EvalSettings = field(default_factory=EvalSettings)
    timings: dict[str, float] = field(default_factory=dict)
    _anchors: dict[str, Judged] = field(default_factory=dict)

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

    def anchor_cells(self, concept: str) -> list[Cell]:
        """The concept's grid cells prompted with what erasing it should leave (world.py's
        anchor_prompt), labelled with the cell they stand for."""
        kind = concept_kind(concept)
        return [
            Cell(c.obj, c.style, c.seed, anchor_prompt(c.obj, c.style, kind))
            for c in self.grid()
            if concept in (c.obj, c.style)
        ]

    def base_anchors(self, concept: str) -> Judged:
        """The base model's anchor images for `concept` (call before applying patches)."""
        if concept not in self._anchors:
            self._anchors[concept] = self.judge(self.anchor_cells(concept), "base_s")
        return self._anchors[concept]

    def measure(
        self, base_grid: Judged, patches: list, concepts: list[str], joint: bool
    ) -> tuple[dict[str, dict], Judged]:
        """Apply `patches`, score each erased concept against the base, remove them; returns
        the scores per concept and the patched grid.

        `joint`: the patches erase all `concepts` together (IRA/CRA then count only cells
        naming none of them)."""
        from bench.minicanvas.erasure_scores import patched_block

        anchors = {c: self.base_anchors(c) for c in concepts}
        for patch in patches:
            patch.apply(self.pipe)
        try:
            grid = self.judge(self.grid(), "patched_s")
            blocks = {}
            for concept in concepts:
                synonyms = self.judge([c for c, _ in self.synonym_cells(concept)], "patched_s")
                implicit = None
                if concept_kind(concept) == "style":
                    implicit = self.judge(self.implicit_cells(concept), "patched_s")
                erased = frozenset(concepts) if joint else frozenset()
                blocks[concept] = patched_block(
                    concept, base_grid, grid, synonyms, implicit, anchors[concept], erased
                )
        finally:
            for patch in reversed(patches):
                patch.remove(self.pipe)
        return blocks, grid

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
        images = generate(self.pipe, requests, s.steps, s.guidance, s.batch, desc=timing)
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
