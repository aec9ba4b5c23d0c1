"""`conceptguard bench quality`: run the MiniCanvas quality benchmark, print a table, write JSON
and a PNG grid (rows objects, columns styles; base on the left, patched on the right)."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from bench.minicanvas.quality import (
    PATCHED_FIELDS,
    SCHEMA,
    EvalSettings,
    Evaluator,
    base_block,
    concept_kind,
    gates,
    patched_block,
    summarise,
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
    from PIL import Image

    s = evaluator.settings
    first_seed = evaluator.seeds()[0]

    def sheet(judged) -> np.ndarray:
        lookup = {(c.obj, c.style): i for i, c in enumerate(judged.cells) if c.seed == first_seed}
        rows = []
        for o in s.objects:
            row = [judged.images[lookup[(o, st)]] for st in s.styles]
            rows.append(
                torch.cat([torch.nn.functional.pad(x, (1, 1, 1, 1), value=1) for x in row], 2)
            )
        return ((torch.cat(rows, 1) + 1) * 127.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()

    parts = [sheet(base)]
    if patched is not None:
        gap = np.full((parts[0].shape[0], 8, 3), 255, np.uint8)
        parts += [gap, sheet(patched)]
    image = Image.fromarray(np.concatenate(parts, 1))
    image.resize((image.width * 3, image.height * 3), Image.NEAREST).save(path)


def run_quality(args) -> dict:
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.judge import load_judge
    from patches.patch import Patch

    started = time.perf_counter()
    settings = _settings(args)
    concepts = _concepts(args.concept, settings)
    if args.patch and not concepts:
        raise SystemExit("conceptguard: --patch needs --concept (what the patches erase)")
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
    patched_grid = None
    if patches:
        for patch in patches:
            patch.apply(pipe)
        try:
            patched_grid = evaluator.judge(evaluator.grid(), "patched_s")
            per_concept = {}
            # A comma list names what one patch stack erases together.
            erased = frozenset(concepts) if "," in (args.concept or "") else frozenset()
            for concept in concepts:
                syn = evaluator.judge([c for c, _ in evaluator.synonym_cells(concept)], "patched_s")
                implicit = None
                if concept_kind(concept) == "style":
                    implicit = evaluator.judge(evaluator.implicit_cells(concept), "patched_s")
                per_concept[concept] = patched_block(
                    concept, base_grid, patched_grid, syn, implicit, erased
                )
        finally:
            for patch in reversed(patches):
                patch.remove(pipe)
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
    for name in ("per_concept",):
        blocks.update(result.get(name, {}))
    if "mean" in result:
        blocks["MEAN"], blocks["WORST"] = result["mean"], result["worst"]
    if blocks:
        header = "concept".ljust(12) + "".join(f"{f:>12}" for f in PATCHED_FIELDS)
        print(header)
        for name, block in blocks.items():
            cells = []
            for f in PATCHED_FIELDS:
                v = block.get(f)
                cells.append(f"{v:12.5f}" if f == "drift" and v is not None else f"{pct(v):>12}")
            print(name.ljust(12) + "".join(cells))
    print("timings: " + ", ".join(f"{k} {v}s" for k, v in result["timings"].items()))


def quality_command(args: argparse.Namespace) -> int:
    from patches.atomic import atomic_write_json

    result = run_quality(args)
    print_table(result)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0
