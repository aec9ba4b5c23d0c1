"""`conceptguard bench quality`: run the MiniCanvas quality benchmark, print a table, write JSON
and a PNG grid (rows objects, columns styles; base on the left, patched on the right)."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from bench.minicanvas.erasure_scores import summarise, table_lines
from bench.minicanvas.quality import (
    SCHEMA,
    EvalSettings,
    Evaluator,
    base_block,
    concept_kind,
    gates,
)
from bench.minicanvas.world import OBJECTS, STYLES


def add_parser(commands: argparse._SubParsersAction) -> None:
    quality = commands.add_parser("quality", help="MiniCanvas erasure quality (UA/IRA/CRA)")
    quality.add_argument("--model", default="models/minicanvas")
    quality.add_argument("--patch", action="append", default=[], help="patch file (repeatable)")
    quality.add_argument(
        "--concept",
        help="what the patches erase: an object or style, several joined by commas (one "
        "multi-concept patch: IRA/CRA then count only cells naming none of them), "
        "all-objects or all-styles",
    )
    quality.add_argument("--seeds", type=int, default=4)
    quality.add_argument("--steps", type=int, default=EvalSettings.steps)
    quality.add_argument("--guidance", type=float, default=EvalSettings.guidance)
    quality.add_argument(
        "--cells",
        choices=("all", "ci"),
        default="all",
        help="ci: 4 objects x 4 styles, the cheap tier",
    )
    quality.add_argument("--json", dest="json_out", help="write the result JSON here")
    quality.add_argument("--grid", help="write the PNG sample grid here")
    quality.add_argument(
        "--negative-control",
        action="store_true",
        help="instead of --patch, train and score a deliberately degenerate patch that turns "
        "the concept's images into black frames (negative_control.py): UA calls it a perfect "
        "erasure, the clean-erasure rate must not",
    )
    quality.set_defaults(func=quality_command)


def _model_hash(pipe) -> str:
    from patches.targets import fingerprint

    parts = [fingerprint(getattr(pipe, c)) for c in ("text_encoder", "unet", "vae")]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _settings(args) -> EvalSettings:
    if args.cells == "ci":
        return EvalSettings(
            seeds=args.seeds,
            steps=args.steps,
            guidance=args.guidance,
            objects=OBJECTS[:4],
            styles=STYLES[:4],
        )
    return EvalSettings(seeds=args.seeds, steps=args.steps, guidance=args.guidance)


def _concepts(concept: str | None, settings: EvalSettings) -> list[str]:
    if concept is None:
        return []
    if concept == "all-objects":
        return list(settings.objects)
    if concept == "all-styles":
        return list(settings.styles)
    names = [c.strip() for c in concept.split(",") if c.strip()]
    for name in names:
        concept_kind(name)
    return names


def write_grid(path: Path, evaluator: Evaluator, base, patched=None) -> None:
    """Rows objects, columns styles at the first seed; base left, patched right."""
    from bench.minicanvas.sheets import grid_panels, save_panels

    s = evaluator.settings
    judged = [base] if patched is None else [base, patched]
    save_panels(path, grid_panels(judged, s.objects, s.styles, evaluator.seeds()[0]))


def run_quality(args) -> dict:
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.judge import load_judge
    from patches.patch import Patch

    started = time.perf_counter()
    settings = _settings(args)
    concepts = _concepts(args.concept, settings)
    if (args.patch or args.negative_control) and not concepts:
        raise SystemExit("conceptguard: --patch needs --concept (what the patches erase)")
    if args.negative_control and (args.patch or len(concepts) != 1):
        raise SystemExit("conceptguard: --negative-control takes one --concept and no --patch")
    model = Path(args.model)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    judges = [
        load_judge(model / "judges" / f"{name}.safetensors") for name in ("pooled", "strided")
    ]
    evaluator = Evaluator(pipe, judges, settings)

    judge_report = evaluator.judge_real_accuracy()
    base_grid = evaluator.judge(evaluator.grid(), "base_s")
    synonym_cells = evaluator.synonym_cells()
    base_synonyms = evaluator.judge([c for c, _ in synonym_cells], "base_s")
    base_implicit = evaluator.judge(evaluator.implicit_cells(), "base_s")
    base = base_block(base_grid, base_synonyms, [k for _, k in synonym_cells], base_implicit)
    result = {
        "schema": SCHEMA,
        "concept": args.concept,
        "judges": judge_report,
        "base": base,
        "gates": gates(judge_report, base),
    }
    patches = [Patch.load(p) for p in args.patch]
    if args.negative_control:
        from bench.minicanvas.negative_control import blackout_patch

        patches = [blackout_patch(pipe, concepts[0])]
    patched_grid = None
    if patches:
        # A comma list names what one patch stack erases together.
        joint = "," in (args.concept or "")
        per_concept, patched_grid = evaluator.measure(base_grid, patches, concepts, joint)
        if len(concepts) == 1:
            result["patched"] = per_concept[concepts[0]]
        else:
            result["per_concept"] = per_concept
            result["mean"], result["worst"] = summarise(per_concept)
    result["config"] = {
        "model": str(model),
        "model_hash": _model_hash(pipe),
        "patches": [
            {
                "id": p.id,
                "kind": p.manifest.kind,
                "method": p.manifest.method,
                "concepts": p.manifest.concepts,
            }
            for p in patches
        ],
        "sampler": type(pipe.scheduler).__name__,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "seeds": evaluator.seeds(),
        "objects": list(settings.objects),
        "styles": list(settings.styles),
        "judge": "pooled (primary), strided (agreement)",
    }
    total = time.perf_counter() - started
    result["timings"] = {
        **{k: round(v, 2) for k, v in evaluator.timings.items()},
        "total_s": round(total, 2),
    }
    if args.grid:
        write_grid(Path(args.grid), evaluator, base_grid, patched_grid)
    return result


def print_table(result: dict) -> None:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    print("judges on held-out real images:")
    for name, j in result["judges"].items():
        print(f"  {name:<8} style {pct(j['style_acc'])}  object {pct(j['object_acc'])}")
    b = result["base"]
    print(
        f"base model: style {pct(b['style_acc'])}  object {pct(b['object_acc'])}  "
        f"synonyms {pct(b['synonym_acc'])}  implicit {pct(b['implicit_acc'])}  "
        f"judge agreement {pct(b['judge_agreement'])}"
    )
    print(
        "gates: " + "  ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in result["gates"].items())
    )
    blocks = {}
    if "patched" in result:
        blocks[result["concept"]] = result["patched"]
    blocks.update(result.get("per_concept", {}))
    if "mean" in result:
        blocks["MEAN"], blocks["WORST"] = result["mean"], result["worst"]
    if blocks:
        print("\n".join(table_lines(blocks)))
        for name, block in blocks.items():
            counts = block.get("degenerate_counts")
            if counts:
                flagged = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "cells" and v)
                print(
                    f"{name}: degenerate images on its {counts['cells']} cells: "
                    f"{flagged or 'none'}; anchor distance {block['anchor_distance']:.4f} "
                    f"(base {block['anchor_distance_base']:.4f})"
                )
    print("timings: " + ", ".join(f"{k} {v}s" for k, v in result["timings"].items()))


def quality_command(args: argparse.Namespace) -> int:
    from patches.atomic import atomic_write_json

    result = run_quality(args)
    print_table(result)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0
