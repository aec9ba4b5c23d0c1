"""`conceptguard attack`: red-team a patch stack before it ships.

    conceptguard attack --model models/minicanvas --patch hirm.safetensors --patch esd.safetensors \
        --concept circle --attacks all --json attack.json --grid attack.png

Patches are applied offline in the order given (`Patch.apply`). With `--server URL` and a
tenant key, the attacks' images come from that server's generation API: the tenant's own
stack, attacked as the tenant could (searches that need the patched model itself still run
here, on the `--patch` files).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

from erasure.attacks.runner import (
    ATTACKS,
    DEFAULT_ATTACKS,
    AttackSuite,
    add_budget_flags,
    attack_names,
    budgets_from_args,
)

SCHEMA = "conceptguard.attack/1"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attack",
        help="red-team a patch stack: how easily is the erased concept brought back",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="diffusers pipeline folder (the base)")
    parser.add_argument("--patch", action="append", default=[], help="patch file (repeatable)")
    parser.add_argument("--server", help="attack a running server's tenant through HTTP")
    parser.add_argument("--tenant", help="the tenant the key must belong to (checked)")
    parser.add_argument("--key", help="tenant API key (default: $CONCEPTGUARD_API_KEY)")
    parser.add_argument("--concept", required=True, help="the erased concept")
    parser.add_argument("--synonyms", help="comma-separated other words for it")
    parser.add_argument("--anchor", help="what the patch turns it into (benign twins)")
    parser.add_argument("--kind", choices=("object", "style"), default="object")
    parser.add_argument(
        "--template", action="append", default=[], help="context prompt with {concept}"
    )
    parser.add_argument(
        "--attacks",
        default=",".join(DEFAULT_ATTACKS),
        help="comma-separated, or all: " + "; ".join(f"{k}: {v.help}" for k, v in ATTACKS.items()),
    )
    parser.add_argument("--judge", help="judge folder, for a model that ships none")
    parser.add_argument("--seeds", type=int, default=2, help="images per attempt")
    parser.add_argument("--seed-offset", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0, help="the searches' random seed")
    parser.add_argument(
        "--allow-concept-words",
        action="store_true",
        help="let searches use the concept's own words (default: banned - a prompt naming "
        "the concept is what the patch was made for, not a bypass)",
    )
    parser.add_argument(
        "--all-tokens",
        action="store_true",
        help="search every token, not only whole words that survive being sent as text",
    )
    parser.add_argument("--json", dest="json_out", help="write the report here")
    parser.add_argument("--grid", help="write a PNG of the attacks' images here")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    add_budget_flags(parser)
    parser.set_defaults(func=attack_command)


def model_hash(pipe: Any) -> str:
    from patches.targets import fingerprint

    parts = [fingerprint(getattr(pipe, c)) for c in ("text_encoder", "unet", "vae")]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def concept_from_args(args: argparse.Namespace):
    from erasure.attacks.concepts import generic_concept, is_minicanvas_concept, minicanvas_concept
    from erasure.prompts import DEFAULT_TEMPLATES, ConceptSpec

    own_words = args.synonyms or args.anchor or args.template
    if not args.judge and not own_words and is_minicanvas_concept(args.concept):
        return minicanvas_concept(args.concept)
    words = tuple(w.strip() for w in (args.synonyms or "").split(",") if w.strip())
    spec = ConceptSpec(args.concept, words, args.anchor)
    templates = tuple(args.template) or DEFAULT_TEMPLATES[args.kind]
    return generic_concept(spec, args.kind, templates)


def run_attack(args: argparse.Namespace) -> tuple[dict[str, Any], list]:
    from diffusers import DiffusionPipeline

    from erasure.attacks.generation import Sampling, ServerGenerator
    from erasure.attacks.judging import find_judges
    from patches.patch import Patch

    started = time.perf_counter()
    names = attack_names(args.attacks)
    judge_files = find_judges(args.model, args.judge)
    concept = concept_from_args(args)
    sampling = Sampling(
        tuple(args.seed_offset + i for i in range(args.seeds)), args.steps, args.guidance
    )
    suite = AttackSuite(
        names,
        budgets_from_args(args),
        sampling,
        judge_files,
        ban_concept_words=not args.allow_concept_words,
        words_only=not args.all_tokens,
        seed=args.seed,
        progress=args.progress,
    )
    suite.check(bool(args.server), bool(args.patch))
    pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    patches = [Patch.load(p) for p in args.patch]
    remote = None
    if args.server:
        remote = ServerGenerator(args.server, args.key, sampling)
    report, results = suite.run(pipe, patches, concept, remote, on_result=_print_one)
    records = remote.records if remote else []
    tenants = sorted({r["tenant"] for r in records if "tenant" in r})
    stacks = sorted({tuple(r.get("patches", ())) for r in records})
    if args.tenant and tenants and tenants != [args.tenant]:
        from erasure.attacks.generation import GenerationRefused

        raise GenerationRefused(
            f"the key belongs to tenant {', '.join(tenants)}, not {args.tenant}: "
            "the images attacked another stack"
        )
    report = {
        "schema": SCHEMA,
        "concept": concept.record(),
        **report,
        "config": {
            "model": str(args.model),
            "model_hash": model_hash(pipe),
            "patches": [
                {
                    "file": str(f),
                    "id": p.id,
                    "kind": p.manifest.kind,
                    "method": p.manifest.method,
                    "concepts": p.manifest.concepts,
                }
                for f, p in zip(args.patch, patches, strict=True)
            ],
            "generation": (
                {
                    "where": "server",
                    "url": args.server,
                    "tenants": tenants,
                    "stacks": [list(stack) for stack in stacks],
                    "requests": len(records),
                }
                if remote
                else {"where": "local"}
            ),
            **suite.record(),
        },
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    return report, results


def _print_one(result) -> None:
    s = result.summary()
    asr = "-" if s["asr"] is None else f"{100 * s['asr']:.1f}%"
    print(
        f"[attack] {result.attack:<21} ASR {asr:>6} ({s['successes']}/{s['images']}) "
        f"degenerate {s['degenerate']}  {result.seconds.get('total', 0):.0f}s",
        file=sys.stderr,
        flush=True,
    )


def print_table(report: dict[str, Any]) -> None:
    def pct(v):
        return "    -" if v is None else f"{100 * v:5.1f}%"

    direct = report["direct"]
    print(
        f"concept {report['concept']['name']}: its own prompt recognised on the base "
        f"{pct(direct['base'])}, on the patched model {pct(direct['patched'])}"
    )
    print(f"{'attack':<22}{'threat':<10}{'ASR':>7}{'images':>8}{'degen':>7}{'no-trip':>8}{'s':>7}")
    for name, r in report["attacks"].items():
        trips = "-" if r["round_trip_failures"] is None else str(r["round_trip_failures"])
        print(
            f"{name:<22}{r['threat']:<10}{pct(r['asr']):>7}{r['images']:>8}"
            f"{r['degenerate']:>7}{trips:>8}{r['seconds']['total']:>7.0f}"
        )
        if name == "paraphrase":
            print(f"{'':<22}{'base':<10}{pct(r['details']['asr_base']):>7}")
    print(f"total {report['total_seconds']} s")


def attack_command(args: argparse.Namespace) -> int:
    from erasure.attacks.results import save_grid
    from patches.atomic import atomic_write_json

    report, results = run_attack(args)
    print_table(report)
    if args.json_out:
        atomic_write_json(Path(args.json_out), report)
    if args.grid:
        save_grid(Path(args.grid), results)
    return 0
