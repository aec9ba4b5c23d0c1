"""`conceptguard erase hirm`: train a HiRM text-encoder patch and report on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from erasure.cli_args import (
    add_output_arguments,
    add_prompt_arguments,
    add_retain_arguments,
    concepts_from_args,
    prompts_from_args,
)
from erasure.hirm.config import VARIANTS, HirmConfig
from erasure.prompts import PromptError, read_pair_file
from erasure.verdict import judge_patch


def add_parser(commands: argparse._SubParsersAction) -> None:
    hirm = commands.add_parser(
        "hirm",
        help="HiRM: edit the first text-encoder block(s), loss on the last",
        description=(
            "Train a HiRM text_encoder patch. Repeat --concept to erase several concepts in "
            "one patch; --synonyms and --anchor then apply in the same order (one --anchor "
            "alone applies to all). SDXL gets two files, one per text encoder."
        ),
    )
    add_prompt_arguments(hirm)
    hirm.add_argument("--variant", choices=VARIANTS, default="S")
    hirm.add_argument("--pairs", help="V: tab-separated 'with<TAB>without' prompt pairs")
    add_retain_arguments(
        hirm,
        prompts_help="unrelated prompts to keep, one per line",
        weight_default=None,
        weight_help="default 50 for R, 20 for S and V",
    )
    hirm.add_argument("--blocks", default="0", help="trainable blocks, e.g. 0 or 0,1")
    hirm.add_argument(
        "--steps",
        type=int,
        help="fixed step count (default: S and V train until the concept's states reach "
        "their target, 20-200 steps; R 60)",
    )
    hirm.add_argument(
        "--lr", type=float, help="Adam step size (default: 0.128 / the encoder's width)"
    )
    hirm.add_argument("--scale", type=float, help="c (R: default 20x token norm; S: 1)")
    hirm.add_argument("--eta", type=float, default=HirmConfig.eta)
    hirm.add_argument(
        "--adversarial-rounds",
        type=int,
        default=0,
        help="harden the patch: rounds of an adaptive Ring-A-Bell search against it, each "
        "folding the prompts found into a retraining (erasure/hirm/hardened.py; needs --anchor)",
    )
    add_output_arguments(hirm)
    hirm.set_defaults(func=hirm_command)


def config_from_args(args: argparse.Namespace) -> tuple[HirmConfig, str]:
    """The run's config and where its retain prompts came from."""
    try:
        blocks = tuple(int(b) for b in args.blocks.split(","))
    except ValueError:
        raise PromptError(
            f"--blocks takes block indices like 0 or 0,1, not {args.blocks!r}"
        ) from None
    concepts = concepts_from_args(args)
    prompts = prompts_from_args(args, concepts)
    config = HirmConfig(
        concepts=concepts,
        variant=args.variant,
        kind=args.kind,
        templates=prompts.templates,
        blocks=blocks,
        steps=args.steps,
        lr=args.lr,
        scale=args.scale,
        eta=args.eta,
        pairs=read_pair_file(args.pairs) if args.pairs else None,
        retain_prompts=prompts.retain,
        check_prompts=prompts.check,
        retain_weight=args.retain_weight,
        seed=args.seed,
        device=args.device,
        name=args.name,
    )
    return config, prompts.retain_source


def output_paths(output: Path, components: list[str]) -> list[Path]:
    """One encoder: the path as given. Two (SDXL): <stem>.<component><suffix> each."""
    if len(components) == 1:
        return [output]
    return [output.with_name(f"{output.stem}.{c}{output.suffix}") for c in components]


def hirm_command(args: argparse.Namespace) -> int:
    from erasure.hirm import erase_hirm
    from patches.loading import load_pipeline

    config, retain_source = config_from_args(args)
    config.check()
    pipe = load_pipeline(args.model, args.dtype, args.device)
    rounds = []
    if args.adversarial_rounds:
        from erasure.hirm.hardened import Hardening, harden_hirm

        hardened = harden_hirm(pipe, config, Hardening(args.adversarial_rounds, seed=args.seed))
        result, rounds = hardened.result, hardened.rounds
    else:
        result = erase_hirm(pipe, config)
    paths = output_paths(Path(args.output), [p.manifest.target.component for p in result.patches])
    written = []
    for patch, path in zip(result.patches, paths, strict=True):
        patch_id = patch.save(path)
        written.append({"path": str(path), "id": patch_id, "file_bytes": len(patch.to_bytes())})
    verdicts = [
        judge_patch(
            r.get("check_drift", {}),
            r["target_displacement"],
            retained=bool(config.retain_prompts),
            gap_left=None
            if config.variant == "R"
            else r["target_gap_after"] / max(r["target_gap_before"], 1e-12),
        )
        for r in result.reports
    ]
    summary = {
        "method": "hirm",
        "variant": config.variant,
        "concepts": [c.name for c in config.concepts],
        "seconds": round(result.seconds, 3),
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "patches": written,
        "encoders": result.reports,
        "retain_source": retain_source,
        "verdict": [v.to_dict() for v in verdicts],
        "adversarial_rounds": rounds,
    }
    print_summary(summary)
    for report, verdict in zip(result.reports, verdicts, strict=True):
        prefix = f"{report['component']}: " if len(verdicts) > 1 else ""
        print("\n".join(prefix + line for line in verdict.lines()))
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), summary)
    return 0


def print_summary(summary: dict) -> None:
    mib = summary["peak_memory_bytes"] / 2**20
    label = "GPU allocated" if summary["peak_memory_kind"] == "cuda_allocated" else "process RSS"
    print(
        f"HiRM-{summary['variant']} for {', '.join(summary['concepts'])}: "
        f"{summary['seconds']:.2f} s, peak memory {mib:.0f} MiB ({label})"
    )
    for item in summary["patches"]:
        print(f"  wrote {item['path']}  {item['file_bytes'] / 1024:.1f} KiB  id {item['id'][:16]}")
    print(
        f"  {'encoder':<16}{'layer':<13}{'displacement':>13}{'gap before':>12}"
        f"{'gap after':>11}{'retain drift':>14}{'start token':>13}"
    )
    for r in summary["encoders"]:
        print(
            f"  {r['component']:<16}{r['layer']:<13}{r['target_displacement']:>13.4f}"
            f"{r['target_gap_before']:>12.4f}{r['target_gap_after']:>11.4f}"
            f"{r['retain_drift']:>14.4f}{r['start_token_drift']:>13.2e}"
        )
    drift_on = summary["encoders"][0]["retain_drift_on"]
    r0 = summary["encoders"][0]
    print(
        f"  {r0['prompts']} concept prompts, {r0['steps']} steps at lr {r0['lr']:.2e}; "
        f"retain prompts: {summary['retain_source']}"
    )
    print(f"  (relative changes of token states; retain drift measured on {drift_on})")
