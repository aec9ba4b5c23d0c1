"""Erasure scores on MiniCanvas that damage cannot game.

A closed-set judge calls a black frame `none`, so "the judge no longer sees the concept" (UA)
also rewards a patch that breaks the concept's images. The headline here is the
clean-erasure rate: on the erased concept's cells, the share of images that show what the
anchor would give and are real images:
- object erased: the judge sees no object (`none`) AND still sees the cell's style AND the
  image is not degenerate (the style on an empty canvas);
- style erased: the judge no longer sees that style AND still sees the cell's object AND
  the image is not degenerate (an object without the style; `plain` is the anchor, another
  style counts too and is reported as `substituted`).

An image is degenerate when it is near-constant, near-black or near-white, or has far less
contrast than anything the base model draws for the same group of cells (the cell's style
when objects are erased, its object when styles are), counting the base's anchor images.
The thresholds are in DEGENERATE; BENCHMARKS.md gives their reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench.minicanvas.world import (
    NONE_OBJECT,
    OBJECT_CLASSES,
    OBJECTS,
    PLAIN_STYLE,
    STYLE_CLASSES,
)

if TYPE_CHECKING:
    from bench.minicanvas.quality import Cell, Judged

DEGENERATE = {
    # Pixel standard deviation (pixels in [0, 1]) below which an image is one flat colour.
    "constant_contrast": 0.02,
    # Mean brightness of a near-black / near-white frame, and the level its brightest
    # (darkest) 1% of pixels must stay under (over): a neon pattern is dark on average but
    # has bright lines, a sketch pattern pale but has hatching.
    "dark_brightness": 0.1,
    "light_brightness": 0.9,
    "structure_quantile": 0.99,
    "structure_level": 0.5,
    # Contrast below this fraction of the lowest contrast the base draws for the group.
    "low_contrast_ratio": 0.5,
}
FLAGS = ("near_constant", "near_black", "near_white", "low_contrast")

# Per concept: the fields a mean/worst summary covers, and which direction is worse.
PATCHED_FIELDS = (
    "clean",
    "UA",
    "clean_synonyms",
    "UA_synonyms",
    "clean_implicit",
    "UA_implicit",
    "IRA",
    "CRA",
    "kept",
    "substituted",
    "degenerate",
    "degenerate_other",
    "anchor_distance",
    "drift",
    "clean_base",
    "UA_base",
    "IRA_base",
    "CRA_base",
    "anchor_distance_base",
)
HIGHER_IS_WORSE = {"substituted", "degenerate", "degenerate_other", "anchor_distance", "drift"}


def kind_of(concept: str) -> str:
    return "object" if concept in OBJECTS else "style"


def group_of(cell: Cell, kind: str) -> str:
    """The attribute an erasure of `kind` must keep: the style for objects, the object for
    styles."""
    return cell.style if kind == "object" else cell.obj


def image_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean brightness, contrast = pixel std, per-image luminance values) in [0, 1]."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    flat = x.flatten(1).numpy()
    luminance = x.mean(1).flatten(1).numpy()
    return flat.mean(1), flat.std(1), luminance


@dataclass(frozen=True)
class Reference:
    """The base model's image statistics per group: the lowest contrast it draws there."""

    contrast_min: dict[str, float]

    @classmethod
    def from_base(cls, judged: list[Judged], kind: str) -> Reference:
        contrast: dict[str, list[float]] = {}
        for part in judged:
            _, c, _ = image_stats(part.images)
            for cell, value in zip(part.cells, c, strict=True):
                contrast.setdefault(group_of(cell, kind), []).append(float(value))
        return cls({g: min(v) for g, v in contrast.items()})


def degenerate_flags(
    images: torch.Tensor, cells: list[Cell], kind: str, reference: Reference
) -> dict[str, np.ndarray]:
    """Per image, each flag of FLAGS and `any`."""
    d = DEGENERATE
    brightness, contrast, luminance = image_stats(images)
    q = d["structure_quantile"]
    brightest = np.quantile(luminance, q, axis=1)
    darkest = np.quantile(luminance, 1 - q, axis=1)
    floor = np.array([reference.contrast_min[group_of(c, kind)] for c in cells])
    flags = {
        "near_constant": contrast < d["constant_contrast"],
        "near_black": (brightness < d["dark_brightness"]) & (brightest < d["structure_level"]),
        # Sketch and watercolor patterns are pale too: only a pale frame with less contrast
        # than anything the base draws for the group counts.
        "near_white": (brightness > d["light_brightness"])
        & (darkest > d["structure_level"])
        & (contrast < floor),
        "low_contrast": contrast < d["low_contrast_ratio"] * floor,
    }
    flags["any"] = np.logical_or.reduce([flags[f] for f in FLAGS])
    return flags


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _labels(cells: list[Cell]) -> np.ndarray:
    return np.array([c.labels for c in cells]).reshape(-1, 2)


def erasure_outcomes(
    judged: Judged, concept: str, reference: Reference, keep: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per image of `judged` (restricted to `keep`): missed (the judge does not see the
    concept: UA), gone (objects: it sees no object; styles: as missed), kept (it still sees
    the other attribute), substituted (another object or style), each degenerate flag and
    any of them, clean (gone, kept and not degenerate)."""
    kind = kind_of(concept)
    keep = np.ones(len(judged.cells), bool) if keep is None else keep
    cells = [c for c, k in zip(judged.cells, keep, strict=True) if k]
    labels = _labels(cells)
    objects, styles = judged.objects[keep], judged.styles[keep]
    flags = degenerate_flags(judged.images[torch.from_numpy(keep)], cells, kind, reference)
    if kind == "object":
        index, neutral = OBJECT_CLASSES.index(concept), OBJECT_CLASSES.index(NONE_OBJECT)
        missed = objects != index
        gone = objects == neutral
        kept = styles == labels[:, 1]
        substituted = missed & ~gone
    else:
        index, neutral = STYLE_CLASSES.index(concept), STYLE_CLASSES.index(PLAIN_STYLE)
        missed = gone = styles != index
        kept = objects == labels[:, 0]
        substituted = missed & (styles != neutral)
    return {
        "missed": missed,
        "gone": gone,
        "kept": kept,
        "substituted": substituted,
        "degenerate": flags["any"],
        "clean": gone & kept & ~flags["any"],
        **{f: flags[f] for f in FLAGS},
    }


def _in(judged: Judged, names: frozenset[str], kind: str) -> np.ndarray:
    return np.array([(c.obj if kind == "object" else c.style) in names for c in judged.cells], bool)


def _anchor_distance(judged: Judged, keep: np.ndarray, anchors: Judged) -> float:
    """Same-seed pixel MSE (pixels in [0, 1]) to the base's anchor image of each cell."""
    lookup = {(c.obj, c.style, c.seed): i for i, c in enumerate(anchors.cells)}
    rows = [lookup[(c.obj, c.style, c.seed)] for c, k in zip(judged.cells, keep, strict=True) if k]
    diff = (judged.images[torch.from_numpy(keep)] - anchors.images[rows]) / 2
    return float(diff.pow(2).mean())


def patched_block(
    concept: str,
    base_grid: Judged,
    patched_grid: Judged,
    patched_synonyms: Judged,
    patched_implicit: Judged | None,
    anchors: Judged,
    erased: frozenset[str] = frozenset(),
) -> dict:
    """Every score of one erased concept (see the module docstring and BENCHMARKS.md).

    `anchors`: the base model's anchor images for the concept's cells (same seeds);
    `erased`: every concept the patch stack erases (IRA/CRA count cells naming none)."""
    kind = kind_of(concept)
    reference = Reference.from_base([base_grid, anchors], kind)
    erased = erased | {concept}
    mine = _in(patched_grid, frozenset({concept}), kind)
    rest = ~_in(patched_grid, erased, kind)
    out = erasure_outcomes(patched_grid, concept, reference, mine)
    base = erasure_outcomes(base_grid, concept, reference, mine)
    synonyms = erasure_outcomes(patched_synonyms, concept, reference)
    implicit = None
    if patched_implicit is not None:
        implicit = erasure_outcomes(patched_implicit, concept, reference)
    labels = _labels(patched_grid.cells)
    same, other = (0, 1) if kind == "object" else (1, 0)
    predicted = (patched_grid.objects, patched_grid.styles)
    base_predicted = (base_grid.objects, base_grid.styles)
    other_flags = degenerate_flags(
        patched_grid.images[torch.from_numpy(rest)],
        [c for c, r in zip(patched_grid.cells, rest, strict=True) if r],
        kind,
        reference,
    )
    drift = ((patched_grid.images[rest] - base_grid.images[rest]) / 2).pow(2).mean()
    return {
        "cells": cell_records(patched_grid, mine, out),
        "clean": _mean(out["clean"]),
        "UA": _mean(out["missed"]),
        "clean_synonyms": _mean(synonyms["clean"]),
        "UA_synonyms": _mean(synonyms["missed"]),
        "clean_implicit": None if implicit is None else _mean(implicit["clean"]),
        "UA_implicit": None if implicit is None else _mean(implicit["missed"]),
        "IRA": _mean(predicted[same][rest] == labels[rest, same]),
        "CRA": _mean(predicted[other][rest] == labels[rest, other]),
        "kept": _mean(out["kept"]),
        "substituted": _mean(out["substituted"]),
        "degenerate": _mean(out["degenerate"]),
        "degenerate_counts": {f: int(out[f].sum()) for f in FLAGS} | {"cells": int(mine.sum())},
        "degenerate_other": _mean(other_flags["any"]),
        "anchor_distance": _anchor_distance(patched_grid, mine, anchors),
        "drift": float(drift),
        "clean_base": _mean(base["clean"]),
        "UA_base": _mean(base["missed"]),
        "IRA_base": _mean(base_predicted[same][rest] == labels[rest, same]),
        "CRA_base": _mean(base_predicted[other][rest] == labels[rest, other]),
        "anchor_distance_base": _anchor_distance(base_grid, mine, anchors),
        "judge_agreement": float(patched_grid.agree.mean()),
    }


def cell_records(judged: Judged, keep: np.ndarray, outcomes: dict[str, np.ndarray]) -> list:
    """Per erased-concept cell: what the judge saw, the image statistics and the flags, so
    an outside reader can recount every rate."""
    brightness, contrast, _ = image_stats(judged.images[torch.from_numpy(keep)])
    cells = [c for c, k in zip(judged.cells, keep, strict=True) if k]
    flags = [f for f in FLAGS if outcomes[f].any()]
    return [
        {
            "object": c.obj,
            "style": c.style,
            "seed": c.seed,
            "judged_object": OBJECT_CLASSES[int(o)],
            "judged_style": STYLE_CLASSES[int(s)],
            "brightness": round(float(b), 4),
            "contrast": round(float(k), 4),
            "clean": bool(outcomes["clean"][i]),
            "flags": [f for f in flags if outcomes[f][i]],
        }
        for i, (c, o, s, b, k) in enumerate(
            zip(cells, judged.objects[keep], judged.styles[keep], brightness, contrast, strict=True)
        )
    ]


def summarise(per_concept: dict[str, dict]) -> tuple[dict, dict]:
    """(mean, worst) over concepts of each field of PATCHED_FIELDS (worst: lowest rate, or
    highest for HIGHER_IS_WORSE)."""
    mean, worst = {}, {}
    for key in PATCHED_FIELDS:
        values = [b[key] for b in per_concept.values() if b.get(key) is not None]
        if not values:
            mean[key] = worst[key] = None
            continue
        mean[key] = float(np.mean(values))
        worst[key] = float(max(values) if key in HIGHER_IS_WORSE else min(values))
    return mean, worst


# The columns a person reads first, in order: the headline, then what it stands beside.
TABLE_FIELDS = (
    "clean",
    "UA",
    "clean_synonyms",
    "UA_synonyms",
    "IRA",
    "IRA_base",
    "CRA",
    "CRA_base",
    "kept",
    "degenerate",
    "anchor_distance",
    "drift",
)
_SHORT = {
    "clean_synonyms": "clean_syn",
    "UA_synonyms": "UA_syn",
    "degenerate": "degen",
    "anchor_distance": "anchor_d",
}


def table_lines(blocks: dict[str, dict], label: str = "concept") -> list[str]:
    """A fixed-width table of TABLE_FIELDS, one row per block (rates in %)."""

    def cell(field: str, value: float | None) -> str:
        if value is None:
            return f"{'-':>10}"
        if field in ("anchor_distance", "drift"):
            return f"{value:10.4f}"
        return f"{100 * value:9.1f}%"

    width = max([len(label), *map(len, blocks)]) + 2
    lines = [label.ljust(width) + "".join(f"{_SHORT.get(f, f):>10}" for f in TABLE_FIELDS)]
    for name, block in blocks.items():
        lines.append(name.ljust(width) + "".join(cell(f, block.get(f)) for f in TABLE_FIELDS))
    return lines
