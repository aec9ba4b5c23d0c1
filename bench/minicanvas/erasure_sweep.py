"""`conceptguard bench erasure-sweep`: make one patch per MiniCanvas concept, measure each.

For every variant and every concept: train the patch (timed), apply it, generate the held-out
grid and the concept's synonym (and, for styles, implicit) cells with the same seeds as the
base, score it (erasure_scores.py: the clean-erasure rate first, UA, IRA, CRA, degenerate
images, distance to the anchor), remove it. Averages and worst cases per kind (objects,
styles). The methods are sweep_methods.py's registry.
`--multi a,b,c` also trains one patch erasing those concepts together and scores each of
them with IRA/CRA counted on cells naming none of them. The base grid is generated once.

`--merge a.json b.json` joins sweeps of disjoint concept lists run with the same settings
(one process per core is the fastest way through a sweep on a small CPU) into one result.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.minicanvas import sweep_attacks
from bench.minicanvas.erasure_scores import summarise, table_lines
from bench.minicanvas.quality import EvalSettings, Evaluator, Judged, concept_kind
from bench.minicanvas.sweep_methods import METHODS, SweepOptions, make_patches
from bench.minicanvas.world import OBJECTS, STYLES

SCHEMA = "conceptguard.minicanvas.sweep/2"
# Acceptance (issues 4 and 15): per-concept averages against the base on the same cells; the
# erasure criteria count clean erasures only (a broken image is not an erased concept).
CRITERIA = {"clean": 0.95, "IRA_drop": 0.05, "CRA_drop": 0.03, "clean_synonyms": 0.90}


def add_parser(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "erasure-sweep", help="one patch per MiniCanvas concept: UA/IRA/CRA averaged"
    )
    sweep.add_argument("--model", default="models/minicanvas")
    sweep.add_argument("--method", choices=sorted(METHODS), default="hirm")
    sweep.add_argument(
        "--variants",
        default="S,R",
        help="comma-separated; " + "; ".join(f"{m.name}: {m.variants}" for m in METHODS.values()),
    )
    sweep.add_argument(
        "--concepts", default="all-objects,all-styles", help="names, all-objects, all-styles"
    )
    sweep.add_argument("--multi", help="also one joint patch for these comma-separated concepts")
    sweep.add_argument("--seeds", type=int, default=4)
    sweep.add_argument(
        "--esd-steps", type=int, help="ESD training steps (default: erasure_settings.py's)"
    )
    sweep.add_argument(
        "--esd-retain-weight",
        type=float,
        default=0.0,
        help="ESD preservation term on the other concepts' captions (0: off, the published ESD)",
    )
    sweep.add_argument(
        "--esd-reference",
        choices=("anchor", "empty"),
        default="anchor",
        help="ESD target's reference prompt: the anchored prompt, or the empty one (published)",
    )
    sweep.add_argument("--json", dest="json_out", help="write the result JSON here")
    sweep.add_argument(
        "--cache",
        help="keep every patch made here and reuse those made before with the same settings "
        "(e.g. a stack row reuses the HiRM and ESD rows' patches)",
    )
    sweep.add_argument(
        "--grid",
        help="write one PNG per variant here (PATH.<variant>.png): per concept, its cells at "
        "the first seed - base, the base's anchor images, patched",
    )
    sweep.add_argument(
        "--markdown",
        action="store_true",
        help="print the result as the markdown table docs/BENCHMARKS.md shows",
    )
    sweep.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: join these sweep results (same settings, disjoint concepts)",
    )
    sweep_attacks.add_flags(sweep)
    sweep.set_defaults(func=sweep_command)


def _concept_list(spec: str) -> list[str]:
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all-objects":
            out += OBJECTS
        elif item == "all-styles":
            out += STYLES
        else:
            concept_kind(item)
            out.append(item)
    return out


def _options(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(
        esd_steps=args.esd_steps,
        esd_retain_weight=args.esd_retain_weight,
        esd_reference=args.esd_reference,
    )


class Sweep:
    def __init__(self, pipe: Any, judges: list, settings: EvalSettings):
        self.pipe = pipe
        self.evaluator = Evaluator(pipe, judges, settings)
        self.base_grid = self.evaluator.judge(self.evaluator.grid(), "base_s")
        self.rows: dict[str, list] = {}  # per variant: image rows for the PNG sheet

    def measure(
        self, patches: list, concepts: list[str], joint: bool, variant: str
    ) -> dict[str, dict]:
        blocks, grid = self.evaluator.measure(self.base_grid, patches, concepts, joint)
        self._keep_rows(variant, concepts, grid)
        return blocks

    def _keep_rows(self, variant: str, concepts: list[str], grid: Judged) -> None:
        from bench.minicanvas.sheets import pick

        first = self.evaluator.seeds()[0]
        for concept in concepts:
            anchors = self.evaluator.base_anchors(concept)
            cells = [c for c in anchors.cells if c.seed == first]
            self.rows.setdefault(variant, []).append(
                [pick(self.base_grid, cells), pick(anchors, cells), pick(grid, cells)]
            )

    def write_sheets(self, stem: Path) -> list[Path]:
        from bench.minicanvas.sheets import save_panels

        written = []
        for variant, rows in self.rows.items():
            path = stem.with_name(f"{stem.name}.{variant.replace('+', '-')}.png")
            save_panels(path, [[row[i] for row in rows] for i in range(3)])
            written.append(path)
        return written


def _criteria(mean: dict) -> dict[str, bool]:
    return {
        "clean": mean["clean"] >= CRITERIA["clean"],
        "IRA": mean["IRA"] >= mean["IRA_base"] - CRITERIA["IRA_drop"],
        "CRA": mean["CRA"] >= mean["CRA_base"] - CRITERIA["CRA_drop"],
        "clean_synonyms": mean["clean_synonyms"] >= CRITERIA["clean_synonyms"],
    }


def summarise_variant(per_concept: dict[str, dict]) -> dict[str, Any]:
    """Means, worst cases and criteria per kind and overall, and make times."""
    summary: dict[str, Any] = {"per_concept": per_concept}
    for kind, names in (("objects", OBJECTS), ("styles", STYLES)):
        chosen = {c: b for c, b in per_concept.items() if c in names}
        if chosen:
            mean, worst = summarise(chosen)
            summary[kind] = {"mean": mean, "worst": worst, "criteria": _criteria(mean)}
    mean, worst = summarise(per_concept)
    summary["all"] = {"mean": mean, "worst": worst, "criteria": _criteria(mean)}
    seconds = [b["make_seconds"] for b in per_concept.values()]
    summary["make_seconds"] = {"mean": sum(seconds) / len(seconds), "max": max(seconds)}
    return summary


# Settings that must agree for sweeps to be joined (everything but the concept list).
_SAME = ("model", "seeds", "steps", "guidance", *(f.name for f in fields(SweepOptions)))


class MergeError(ValueError):
    """Sweeps that cannot be joined into one result."""


def merge_results(parts: list[dict], sources: list[str]) -> dict:
    """One sweep result from sweeps of disjoint concept lists with the same settings."""
    first = parts[0]
    for part, source in zip(parts, sources, strict=True):
        if part.get("schema") != SCHEMA:
            raise MergeError(f"{source} is not a {SCHEMA} result")
        if part["method"] != first["method"]:
            raise MergeError(f"{source}: method {part['method']!r} differs")
        if part["variants"].keys() != first["variants"].keys():
            raise MergeError(f"{source}: variants {list(part['variants'])} differ")
        for key in _SAME:
            if part["config"].get(key) != first["config"].get(key):
                raise MergeError(f"{source}: config {key} {part['config'].get(key)!r} differs")
    concepts = [c for part in parts for c in part["config"]["concepts"]]
    repeated = sorted({c for c in concepts if concepts.count(c) > 1})
    if repeated:
        raise MergeError(f"concepts measured in more than one sweep: {', '.join(repeated)}")
    multis = [part["multi"] for part in parts if "multi" in part]
    if len(multis) > 1:
        raise MergeError("more than one sweep holds a --multi result")
    result: dict[str, Any] = {"schema": SCHEMA, "method": first["method"], "variants": {}}
    for variant in first["variants"]:
        per_concept = {
            c: b for part in parts for c, b in part["variants"][variant]["per_concept"].items()
        }
        result["variants"][variant] = summarise_variant(per_concept)
    if multis:
        result["multi"] = multis[0]
    sheets = [p for part in parts for p in part.get("sheets", [])]
    if sheets:
        result["sheets"] = sheets
    attacked = sweep_attacks.merged(parts, result)
    if attacked:
        result["attacks"] = attacked
    result["config"] = {**first["config"], "concepts": concepts, "merged_from": sources}
    result["timings"] = {
        "parts": [part.get("timings", {}) for part in parts],
        "total_s": round(sum(part.get("timings", {}).get("total_s", 0.0) for part in parts), 1),
    }
    return result


def run_sweep(args: argparse.Namespace) -> dict:
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.judge import load_judge

    started = time.perf_counter()
    model = Path(args.model)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    judges = [load_judge(model / "judges" / f"{n}.safetensors") for n in ("pooled", "strided")]
    settings = EvalSettings(seeds=args.seeds)
    sweep = Sweep(pipe, judges, settings)
    concepts = _concept_list(args.concepts)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    options = _options(args)
    cache = Path(args.cache) if args.cache else None
    attacks = sweep_attacks.SweepAttacks.from_args(args, model)
    result: dict[str, Any] = {"schema": SCHEMA, "method": args.method, "variants": {}}
    for variant in variants:
        per_concept: dict[str, dict] = {}
        for i, concept in enumerate(concepts, 1):
            made = make_patches(pipe, args.method, variant, [concept], options, cache)
            block = sweep.measure(made.patches, [concept], False, variant)[concept]
            block.update(make_seconds=round(made.seconds, 2), text=made.report)
            if attacks:
                block["attacks"] = attacks.measure(pipe, made.patches, concept, variant)
            per_concept[concept] = block
            print(
                f"[sweep] {args.method}-{variant} {i}/{len(concepts)} {concept}: "
                f"clean {block['clean']:.3f} (UA {block['UA']:.3f}) "
                f"IRA {block['IRA']:.3f} (base {block['IRA_base']:.3f}) "
                f"CRA {block['CRA']:.3f} (base {block['CRA_base']:.3f}) "
                f"clean_syn {block['clean_synonyms']:.3f} degenerate {block['degenerate']:.3f} "
                f"make {made.seconds:.1f}s",
                flush=True,
            )
        result["variants"][variant] = summarise_variant(per_concept)
    if args.multi:
        joint = _concept_list(args.multi)
        result["multi"] = {}
        for variant in variants:
            made = make_patches(pipe, args.method, variant, joint, options, cache)
            blocks = sweep.measure(made.patches, joint, True, f"{variant}-joint")
            result["multi"][variant] = {
                "concepts": joint,
                "per_concept": blocks,
                "make_seconds": round(made.seconds, 2),
                "text": made.report,
            }
    if attacks:
        result["attacks"] = attacks.summary(result, concepts, pipe)
    result["config"] = {
        "model": str(model),
        "seeds": sweep.evaluator.seeds(),
        "steps": settings.steps,
        "guidance": settings.guidance,
        "concepts": concepts,
        **options.record(),
    }
    result["timings"] = {
        **{k: round(v, 1) for k, v in sweep.evaluator.timings.items()},
        "total_s": round(time.perf_counter() - started, 1),
    }
    if args.grid:
        result["sheets"] = [str(p) for p in sweep.write_sheets(Path(args.grid))]
        if attacks:
            result["attack_sheets"] = [str(p) for p in attacks.write_sheets(Path(args.grid))]
    return result


def print_table(result: dict) -> None:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    rows, notes = {}, []
    for variant, summary in result["variants"].items():
        for kind in ("objects", "styles", "all"):
            if kind in summary:
                rows[f"{variant} {kind} mean"] = summary[kind]["mean"]
                failed = [k for k, ok in summary[kind]["criteria"].items() if not ok]
                verdict = "all met" if not failed else "NOT met: " + ", ".join(failed)
                notes.append(f"{variant} {kind}: criteria {verdict}")
        notes.append(f"{variant}: make {summary['make_seconds']['mean']:.1f}s mean")
    print("\n".join(table_lines(rows, label="variant")))
    print("\n".join(notes))
    for variant, multi in result.get("multi", {}).items():
        print(f"joint patch ({variant}) erasing {', '.join(multi['concepts'])}:")
        for concept, block in multi["per_concept"].items():
            print(
                f"  {concept:<10} clean {pct(block['clean'])}  UA {pct(block['UA'])}  "
                f"IRA {pct(block['IRA'])} (base {pct(block['IRA_base'])})  "
                f"CRA {pct(block['CRA'])} (base {pct(block['CRA_base'])})"
            )
    timings = result["timings"]
    if "parts" in timings:
        print(f"timings: {len(timings['parts'])} sweeps joined, {timings['total_s']}s in all")
    else:
        print("timings: " + ", ".join(f"{k} {v}s" for k, v in timings.items()))
    sweep_attacks.print_lines(result)


_MARKDOWN = (
    ("clean", "clean"),
    ("UA", "UA"),
    ("clean_synonyms", "clean syn."),
    ("UA_synonyms", "UA syn."),
    ("IRA", "IRA"),
    ("IRA_base", "IRA base"),
    ("CRA", "CRA"),
    ("CRA_base", "CRA base"),
    ("kept", "kept"),
    ("degenerate", "degenerate"),
    ("anchor_distance", "anchor dist."),
    ("drift", "drift"),
)


def markdown_table(result: dict) -> str:
    """Per variant and kind, the mean and worst rows of the sweep (docs/BENCHMARKS.md)."""

    def cell(field: str, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if field in ("anchor_distance", "drift") else f"{100 * value:.1f}%"

    head = ["variant", "concepts", *(label for _, label in _MARKDOWN), "criteria"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, summary in result["variants"].items():
        for kind in ("objects", "styles"):
            if kind not in summary:
                continue
            failed = [k for k, ok in summary[kind]["criteria"].items() if not ok]
            verdict = "all met" if not failed else "not met: " + ", ".join(failed)
            for which in ("mean", "worst"):
                block = summary[kind][which]
                cells = [cell(f, block.get(f)) for f, _ in _MARKDOWN]
                note = verdict if which == "mean" else ""
                lines.append(
                    f"| {variant} | {kind}, {which} | " + " | ".join(cells) + f" | {note} |"
                )
    return "\n".join(lines)


def sweep_command(args: argparse.Namespace) -> int:
    from patches.atomic import atomic_write_json

    if args.merge:
        import json

        try:
            parts = [json.loads(Path(f).read_text()) for f in args.merge]
            result = merge_results(parts, list(args.merge))
        except (OSError, ValueError, KeyError) as error:
            print(f"conceptguard: cannot merge: {error}", file=sys.stderr)
            return 2
    else:
        result = run_sweep(args)
    if args.markdown:
        print(markdown_table(result))
    else:
        print_table(result)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0
