"""`bench complex-prompts`: the cells name the concept inside longer compositions, and the
scores count what the judge sees."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from bench.minicanvas.complex_prompts import FAMILIES, complex_cells, score
from bench.minicanvas.world import OBJECT_CLASSES, OBJECTS, STYLE_CLASSES, STYLES


def test_cells_name_the_concept_in_every_family():
    seeds = [1000, 1001]
    for concept, kind in (("circle", "object"), ("dots", "style")):
        cells = complex_cells(concept, seeds)
        assert {c.family for c in cells} == set(FAMILIES[kind])
        assert all(concept in c.prompt for c in cells)
        per_family = len(STYLES if kind == "object" else OBJECTS) * len(seeds)
        assert len(cells) == per_family * len(FAMILIES[kind])
    implicit = [c for c in complex_cells("circle", [0]) if c.family == "implicit"]
    assert all(c.style not in c.prompt for c in implicit)  # the style is described, not named
    pairs = [c.prompt for c in complex_cells("circle", [0]) if c.family == "two objects"]
    assert any(p.startswith("a drawing of a circle and") for p in pairs)
    assert any(p.endswith(" and a circle in " + p.split(" in ")[-1]) for p in pairs)


def test_scores_count_misses_and_what_is_kept():
    cells = [c for c in complex_cells("dots", [0]) if c.family == "two objects"][:2]
    dots, plain = STYLE_CLASSES.index("dots"), STYLE_CLASSES.index("plain")
    partner = OBJECT_CLASSES.index(cells[0].others[0])
    judged = SimpleNamespace(
        styles=np.array([dots, plain]),
        objects=np.array([partner, OBJECT_CLASSES.index("none")]),
    )
    out = score(cells, judged, np.array([False, True]), "dots")
    assert out["two objects"] == {"UA": 0.5, "kept": 0.5, "degenerate": 0.5, "images": 2}
    assert out["all"]["UA"] == 0.5
