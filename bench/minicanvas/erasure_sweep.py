"""`conceptguard bench erasure-sweep`: make one patch per MiniCanvas concept, measure each.

For every variant and every concept: train the patch (timed), apply it, generate the held-out
grid and the concept's synonym (and, for styles, implicit) cells with the same seeds as the
base, score UA/IRA/CRA, remove it. Averages and worst cases per kind (objects, styles).
`--multi a,b,c` also trains one patch erasing those concepts together and scores each of
them with IRA/CRA counted on cells naming none of them. The base grid is generated once.

`--merge a.json b.json` joins sweeps of disjoint concept lists run with the same settings
(one process per core is the fastest way through a sweep on a small CPU) into one result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.minicanvas.quality import (
    PATCHED_FIELDS,
    EvalSettings,
    Evaluator,
    concept_kind,
    patched_block,
    summarise,
)
from bench.minicanvas.world import OBJECTS, STYLES

SCHEMA = "conceptguard.minicanvas.sweep/1"
# HiRM acceptance (issue 4): per-concept averages against the base on the same cells.
CRITERIA = {"UA": 0.95, "IRA_drop": 0.05, "CRA_drop": 0.03, "UA_synonyms": 0.90}


def add_parser(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "erasure-sweep", help="one patch per MiniCanvas concept: UA/IRA/CRA averaged"
    )
    sweep.add_argument("--model", default="models/minicanvas")
    sweep.add_argument("--method", choices=("hirm", "esd", "stack"), default="hirm")
    sweep.add_argument(
        "--variants",
        default="S,R",
        help="comma-separated: hirm R,S,V; esd x,u; stack e.g. S+x",
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
    sweep.add_argument("--json", dest="json_out", help="write the result JSON here")
    sweep.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: join these sweep results (same settings, disjoint concepts)",
    )
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


def esd_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's ESD settings that differ from erasure_settings.py's."""
    out: dict[str, Any] = {}
    if args.esd_steps:
        out["steps"] = args.esd_steps
    if args.esd_retain_weight:
        out.update(retain=True, retain_weight=args.esd_retain_weight)
    return out


def make_patches(
    pipe: Any, method: str, variant: str, concepts: list[str], esd: dict[str, Any] | None = None
):
    """(patches, seconds to make them, method report) for MiniCanvas concepts.

    hirm: variant R, S or V; esd: variant x or u; stack: "<hirm variant>+<esd mode>", the
    HiRM patch then the ESD LoRA, as a tenant stack would hold them.
    """
    from bench.minicanvas.erasure_settings import esd_config, hirm_config
    from erasure.esd import erase_esd
    from erasure.hirm import erase_hirm

    if method == "hirm":
        result = erase_hirm(pipe, hirm_config(concepts, variant))
        return result.patches, result.seconds, result.reports[0]
    if method == "esd":
        result = erase_esd(pipe, esd_config(concepts, variant, **(esd or {})))
        return [result.patch], result.seconds, result.report
    hirm_variant, _, esd_mode = variant.partition("+")
    text, text_s, text_report = make_patches(pipe, "hirm", hirm_variant, concepts)
    unet, unet_s, unet_report = make_patches(pipe, "esd", esd_mode, concepts, esd)
    return text + unet, text_s + unet_s, {"hirm": text_report, "esd": unet_report}


class Sweep:
    def __init__(self, pipe: Any, judges: list, settings: EvalSettings):
        self.pipe = pipe
        self.evaluator = Evaluator(pipe, judges, settings)
        self.base_grid = self.evaluator.judge(self.evaluator.grid(), "base_s")

    def measure(self, patches: list, concepts: list[str], joint: bool) -> dict[str, dict]:
        ev = self.evaluator
        for patch in patches:
            patch.apply(self.pipe)
        try:
            grid = ev.judge(ev.grid(), "patched_s")
            blocks = {}
            for concept in concepts:
                synonyms = ev.judge([c for c, _ in ev.synonym_cells(concept)], "patched_s")
                implicit = None
                if concept_kind(concept) == "style":
                    implicit = ev.judge(ev.implicit_cells(concept), "patched_s")
                erased = frozenset(concepts) if joint else frozenset()
                blocks[concept] = patched_block(
                    concept, self.base_grid, grid, synonyms, implicit, erased
                )
        finally:
            for patch in reversed(patches):
                patch.remove(self.pipe)
        return blocks


def _criteria(mean: dict) -> dict[str, bool]:
    return {
        "UA": mean["UA"] >= CRITERIA["UA"],
        "IRA": mean["IRA"] >= mean["IRA_base"] - CRITERIA["IRA_drop"],
        "CRA": mean["CRA"] >= mean["CRA_base"] - CRITERIA["CRA_drop"],
        "UA_synonyms": mean["UA_synonyms"] >= CRITERIA["UA_synonyms"],
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
_SAME = ("model", "seeds", "steps", "guidance", "esd_steps", "esd_retain_weight")


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
    result: dict[str, Any] = {"schema": SCHEMA, "method": args.method, "variants": {}}
    for variant in variants:
        per_concept: dict[str, dict] = {}
        for i, concept in enumerate(concepts, 1):
            patches, seconds, report = make_patches(
                pipe, args.method, variant, [concept], esd_overrides(args)
            )
            block = sweep.measure(patches, [concept], joint=False)[concept]
            block.update(make_seconds=round(seconds, 2), text=report)
            per_concept[concept] = block
            print(
                f"[sweep] {args.method}-{variant} {i}/{len(concepts)} {concept}: "
                f"UA {block['UA']:.3f} IRA {block['IRA']:.3f} (base {block['IRA_base']:.3f}) "
                f"CRA {block['CRA']:.3f} (base {block['CRA_base']:.3f}) "
                f"UA_syn {block['UA_synonyms']:.3f} make {seconds:.1f}s",
                flush=True,
            )
        result["variants"][variant] = summarise_variant(per_concept)
    if args.multi:
        joint = _concept_list(args.multi)
        result["multi"] = {}
        for variant in variants:
            patches, seconds, report = make_patches(
                pipe, args.method, variant, joint, esd_overrides(args)
            )
            blocks = sweep.measure(patches, joint, joint=True)
            result["multi"][variant] = {
                "concepts": joint,
                "per_concept": blocks,
                "make_seconds": round(seconds, 2),
                "text": report,
            }
    result["config"] = {
        "model": str(model),
        "seeds": sweep.evaluator.seeds(),
        "steps": settings.steps,
        "guidance": settings.guidance,
        "concepts": concepts,
        "esd_steps": args.esd_steps,
        "esd_retain_weight": args.esd_retain_weight,
    }
    result["timings"] = {
        **{k: round(v, 1) for k, v in sweep.evaluator.timings.items()},
        "total_s": round(time.perf_counter() - started, 1),
    }
    return result


def print_table(result: dict) -> None:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    fields = [f for f in PATCHED_FIELDS if f != "drift"]
    print("variant kind    " + "".join(f"{f:>13}" for f in fields) + "   drift   make s")
    for variant, summary in result["variants"].items():
        for kind in ("objects", "styles", "all"):
            if kind not in summary:
                continue
            mean = summary[kind]["mean"]
            cells = "".join(f"{pct(mean[f]):>13}" for f in fields)
            print(
                f"{variant:<8}{kind:<8}{cells}  {mean['drift']:.4f}  "
                f"{summary['make_seconds']['mean']:6.1f}"
            )
            failed = [k for k, ok in summary[kind]["criteria"].items() if not ok]
            print(
                f"{'':16}criteria: {'all met' if not failed else 'NOT met: ' + ', '.join(failed)}"
            )
    for variant, multi in result.get("multi", {}).items():
        print(f"joint patch ({variant}) erasing {', '.join(multi['concepts'])}:")
        for concept, block in multi["per_concept"].items():
            print(
                f"  {concept:<10} UA {pct(block['UA'])}  IRA {pct(block['IRA'])} "
                f"(base {pct(block['IRA_base'])})  CRA {pct(block['CRA'])} "
                f"(base {pct(block['CRA_base'])})"
            )
    timings = result["timings"]
    if "parts" in timings:
        print(f"timings: {len(timings['parts'])} sweeps joined, {timings['total_s']}s in all")
    else:
        print("timings: " + ", ".join(f"{k} {v}s" for k, v in timings.items()))


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
    print_table(result)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0
