"""`conceptguard bench complex-prompts`: erasure of a concept named inside longer
compositions than the single evaluation template, where ErasePro's first claim (a
non-zero residual leaves erasure incomplete on complex prompts) is tested.

Cell families, every style (for an object) or every object (for a style), fixed seeds:
- objects: `implicit` - the style described, not named, after the object ("a drawing of a
  circle covered in small blue spots"); `adjective` - an adjective before the object ("a
  drawing of a small circle in dots style"); `two objects` - the concept with another object,
  first or second by turns ("a drawing of a circle and a star in dots style");
- styles: `adjective` and `two objects` the same way around the style's object(s).
The patched images are scored against the base on the same cells and seeds: UA (the primary
judge does not see the concept), `kept` (it still sees the cell's other attribute: the
style; for styles, either object), `degenerate` (erasure_scores.py's flags). The base draws
two objects poorly (MiniCanvas never trained on two), so the base's own UA stands beside.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.minicanvas.world import (
    OBJECT_CLASSES,
    OBJECTS,
    STYLE_CLASSES,
    STYLE_DESCRIPTIONS,
    STYLES,
)

SCHEMA = "conceptguard.minicanvas.complex/1"
FAMILIES = {
    "object": ("implicit", "adjective", "two objects"),
    "style": ("adjective", "two objects"),
}


@dataclass(frozen=True)
class ComplexCell:
    family: str
    obj: str
    style: str
    seed: int
    prompt: str
    others: tuple[str, ...] = ()  # objects a style-erased image may show besides `obj`

    @property
    def labels(self) -> tuple[int, int]:
        return OBJECT_CLASSES.index(self.obj), STYLE_CLASSES.index(self.style)


def _partner(obj: str) -> str:
    return OBJECTS[(OBJECTS.index(obj) + 1) % len(OBJECTS)]


def complex_cells(concept: str, seeds: list[int]) -> list[ComplexCell]:
    """The complex cells of one concept (module doc)."""
    cells = []
    if concept in OBJECTS:
        for i, style in enumerate(STYLES):
            other = _partner(concept)
            pair = f"{concept} and a {other}" if i % 2 == 0 else f"{other} and a {concept}"
            prompts = {
                "implicit": f"a drawing of a {concept} {STYLE_DESCRIPTIONS[style]}",
                "adjective": f"a drawing of a small {concept} in {style} style",
                "two objects": f"a drawing of a {pair} in {style} style",
            }
            for family, prompt in prompts.items():
                cells += [ComplexCell(family, concept, style, s, prompt) for s in seeds]
        return cells
    for obj in OBJECTS:
        other = _partner(obj)
        prompts = {
            "adjective": (f"a drawing of a small {obj} in {concept} style", ()),
            "two objects": (f"a drawing of a {obj} and a {other} in {concept} style", (other,)),
        }
        for family, (prompt, others) in prompts.items():
            cells += [ComplexCell(family, obj, concept, s, prompt, others) for s in seeds]
    return cells


def score(cells: list[ComplexCell], judged, degenerate: np.ndarray, concept: str) -> dict:
    """Per family and overall: UA, kept, degenerate (fractions)."""
    is_object = concept in OBJECTS
    index = (OBJECT_CLASSES if is_object else STYLE_CLASSES).index(concept)
    seen = judged.objects if is_object else judged.styles
    missed = seen != index
    if is_object:
        kept = judged.styles == np.array([c.labels[1] for c in cells])
    else:
        kept = np.array(
            [
                OBJECT_CLASSES[o] in (c.obj, *c.others)
                for c, o in zip(cells, judged.objects, strict=True)
            ]
        )
    out = {}
    families = np.array([c.family for c in cells])
    for family in (*FAMILIES["object" if is_object else "style"], "all"):
        pick = np.ones(len(cells), bool) if family == "all" else families == family
        if not pick.any():
            continue
        out[family] = {
            "UA": float(missed[pick].mean()),
            "kept": float(kept[pick].mean()),
            "degenerate": float(degenerate[pick].mean()),
            "images": int(pick.sum()),
        }
    return out


class ComplexBench:
    """Base and patched generations of complex cells, judged, with the sweep's evaluator."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.base: dict[str, tuple[list[ComplexCell], Any, dict]] = {}

    def _judge(self, cells: list[ComplexCell], timing: str):
        from bench.minicanvas.quality import Cell

        plain = [Cell(c.obj, c.style, c.seed, c.prompt) for c in cells]
        return self.evaluator.judge(plain, timing)

    def _degenerate(self, judged, concept: str, reference) -> np.ndarray:
        from bench.minicanvas.erasure_scores import degenerate_flags, kind_of

        return degenerate_flags(judged.images, judged.cells, kind_of(concept), reference)["any"]

    def base_scores(self, concept: str, base_grid) -> dict:
        """The base model's scores on the concept's complex cells (generated once)."""
        if concept not in self.base:
            from bench.minicanvas.erasure_scores import Reference, kind_of

            cells = complex_cells(concept, self.evaluator.seeds())
            judged = self._judge(cells, "base_s")
            anchors = self.evaluator.base_anchors(concept)
            reference = Reference.from_base([base_grid, anchors], kind_of(concept))
            scores = score(cells, judged, self._degenerate(judged, concept, reference), concept)
            self.base[concept] = (cells, reference, scores)
        return self.base[concept][2]

    def patched_scores(self, concept: str, base_grid, patches: list) -> dict:
        self.base_scores(concept, base_grid)
        cells, reference, _ = self.base[concept]
        for patch in patches:
            patch.apply(self.evaluator.pipe)
        try:
            judged = self._judge(cells, "patched_s")
        finally:
            for patch in reversed(patches):
                patch.remove(self.evaluator.pipe)
        return score(cells, judged, self._degenerate(judged, concept, reference), concept)


def styles_only(evaluator, patches: list) -> dict:
    """Object-free style prompts ("a stripes pattern"), every style x seed: the style
    accuracy and the share of images with no object, base and with `patches` applied. What
    a patch erasing every object must still draw."""
    from bench.minicanvas.quality import Cell
    from bench.minicanvas.world import NONE_OBJECT, PATTERN_TEMPLATES

    cells = [
        Cell(NONE_OBJECT, style, seed, PATTERN_TEMPLATES[0].format(style=style))
        for style in STYLES
        for seed in evaluator.seeds()
    ]
    none = OBJECT_CLASSES.index(NONE_OBJECT)
    styles = np.array([c.labels[1] for c in cells])

    def scores(judged) -> dict:
        return {
            "style_acc": float((judged.styles == styles).mean()),
            "no_object": float((judged.objects == none).mean()),
            "images": len(cells),
        }

    base = scores(evaluator.judge(cells, "base_s"))
    for patch in patches:
        patch.apply(evaluator.pipe)
    try:
        patched = scores(evaluator.judge(cells, "patched_s"))
    finally:
        for patch in reversed(patches):
            patch.remove(evaluator.pipe)
    return {"base": base, "patched": patched}


def _concepts(spec: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        out += {"all-objects": list(OBJECTS), "all-styles": list(STYLES)}.get(item, [item])
    return out


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.judge import load_judge
    from bench.minicanvas.quality import EvalSettings, Evaluator
    from bench.minicanvas.sweep_methods import METHODS, SweepOptions, make_patches

    parser = argparse.ArgumentParser(prog="conceptguard bench complex-prompts")
    parser.add_argument("--model", default="models/minicanvas")
    parser.add_argument("--method", action="append", required=True, help="METHOD:VARIANT")
    parser.add_argument("--concepts", default="all-objects,all-styles", help="'' for none")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--joint",
        help="also one patch per --method erasing all these concepts together (e.g. "
        "all-objects): its grid and complex-cell scores per concept and, for objects, the "
        "style accuracy on object-free style prompts",
    )
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    rows = [tuple(m.split(":", 1)) for m in args.method]
    unknown = [m for m, _ in rows if m not in METHODS]
    if unknown or any(len(r) != 2 for r in rows):
        print(f"conceptguard: --method takes METHOD:VARIANT of {sorted(METHODS)}", file=sys.stderr)
        return 2
    concepts = _concepts(args.concepts) if args.concepts else []
    started = time.perf_counter()
    model = Path(args.model)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    judges = [load_judge(model / "judges" / f"{n}.safetensors") for n in ("pooled", "strided")]
    evaluator = Evaluator(pipe, judges, EvalSettings(seeds=args.seeds))
    base_grid = evaluator.judge(evaluator.grid(), "base_s")
    bench = ComplexBench(evaluator)
    result: dict[str, Any] = {"schema": SCHEMA, "base": {}, "rows": {}}
    for concept in concepts:
        result["base"][concept] = bench.base_scores(concept, base_grid)
        for method, variant in rows:
            made = make_patches(pipe, method, variant, [concept], SweepOptions())
            scores = bench.patched_scores(concept, base_grid, made.patches)
            result["rows"].setdefault(f"{method}:{variant}", {})[concept] = scores
            print(
                f"[complex] {method}-{variant} {concept}: UA "
                + ", ".join(f"{f} {100 * s['UA']:.0f}%" for f, s in scores.items())
                + f" (base all {100 * result['base'][concept]['all']['UA']:.0f}%)",
                flush=True,
            )
    if args.joint:
        result["joint"] = {}
        joint = _concepts(args.joint)
        for method, variant in rows:
            made = make_patches(pipe, method, variant, joint, SweepOptions())
            grid, _ = evaluator.measure(base_grid, made.patches, joint, True)
            entry: dict[str, Any] = {
                "concepts": joint,
                "make_seconds": round(made.seconds, 2),
                "grid": grid,
                "complex": {c: bench.patched_scores(c, base_grid, made.patches) for c in joint},
                "complex_base": {c: bench.base_scores(c, base_grid) for c in joint},
            }
            if all(c in OBJECTS for c in joint):
                entry["styles_only"] = styles_only(evaluator, made.patches)
            result["joint"][f"{method}:{variant}"] = entry
            _print_joint(f"{method}:{variant}", entry)
    result["means"] = _means(result)
    result["config"] = {"model": str(model), "seeds": evaluator.seeds(), "concepts": concepts}
    result["timings"] = {"total_s": round(time.perf_counter() - started, 1)}
    print_table(result)
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), result)
    return 0


def _means(result: dict) -> dict:
    """Per row (and the base) and kind: each family's scores averaged over concepts."""
    out: dict[str, dict] = {}
    tables = {"base": result["base"], **result["rows"]}
    for name, per_concept in tables.items():
        for kind, names in (("objects", OBJECTS), ("styles", STYLES)):
            chosen = [per_concept[c] for c in names if c in per_concept]
            if not chosen:
                continue
            families = chosen[0].keys()
            out.setdefault(name, {})[kind] = {
                f: {
                    k: float(np.mean([c[f][k] for c in chosen]))
                    for k in ("UA", "kept", "degenerate")
                }
                for f in families
            }
    return out


def _print_joint(name: str, entry: dict) -> None:
    grid = entry["grid"]
    print(
        f"[joint] {name}, one patch for {len(entry['concepts'])} concepts "
        f"({entry['make_seconds']:.1f} s): clean "
        + ", ".join(f"{c} {100 * b['clean']:.0f}%" for c, b in grid.items())
        + "; UA "
        + ", ".join(f"{c} {100 * b['UA']:.0f}%" for c, b in grid.items())
    )
    if "styles_only" in entry:
        only = entry["styles_only"]
        print(
            f"[joint] {name} object-free style prompts: style accuracy "
            f"{100 * only['patched']['style_acc']:.1f}% "
            f"(base {100 * only['base']['style_acc']:.1f}%), "
            f"no object {100 * only['patched']['no_object']:.1f}% "
            f"(base {100 * only['base']['no_object']:.1f}%)"
        )


def print_table(result: dict) -> None:
    for name, kinds in result["means"].items():
        for kind, families in kinds.items():
            cells = "  ".join(
                f"{f}: UA {100 * s['UA']:5.1f}% kept {100 * s['kept']:5.1f}% degen "
                f"{100 * s['degenerate']:4.1f}%"
                for f, s in families.items()
            )
            print(f"{name:<18} {kind:<8} {cells}")


if __name__ == "__main__":
    raise SystemExit(main())
