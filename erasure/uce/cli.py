"""`conceptguard erase uce`: a closed-form edit of the denoiser's text key/value projections."""

from __future__ import annotations

import argparse

from erasure.cli_args import (
    add_output_arguments,
    add_prompt_arguments,
    add_retain_arguments,
    concepts_from_args,
    prompts_from_args,
)
from erasure.token_pairs import POSITION_SETS
from erasure.uce.config import LAMBDA, UceConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    uce = commands.add_parser(
        "uce",
        help="UCE: closed-form edit of the denoiser's cross-attention keys and values",
        description=(
            "Unified Concept Editing: one closed-form solve per text key/value projection of "
            "the denoiser (U-Net attn2.to_k/to_v; Flux add_k_proj/add_v_proj) sends the "
            "concept's token vectors to its anchor's and holds the retain prompts'. Writes a "
            "unet_lora patch of the edits' exact low-rank factors. Repeat --concept for one "
            "patch erasing several; without --anchor a concept goes to its template with the "
            "slot emptied."
        ),
    )
    add_prompt_arguments(uce)
    add_retain_arguments(
        uce,
        prompts_help="prompts whose keys and values must stay, one per line",
        weight_default=1.0,
        weight_help="scale of the retain prompts' term (default 1, as published)",
    )
    uce.add_argument(
        "--preserve-prompts", dest="retain_prompts", help="the same as --retain-prompts"
    )
    uce.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=LAMBDA,
        help=f"how strongly all other inputs keep the original weights (default {LAMBDA:g})",
    )
    uce.add_argument(
        "--positions",
        choices=POSITION_SETS,
        default="all",
        help="aligned tokens: the concept's only, through the end token, or through the "
        "padding too (default all: the denoiser reads every position)",
    )
    add_output_arguments(uce)
    uce.set_defaults(func=uce_command)


def uce_command(args: argparse.Namespace) -> int:
    from erasure.closed_form_report import print_report, verdicts, write_json
    from erasure.uce import erase_uce
    from patches.loading import load_pipeline

    concepts = concepts_from_args(args)
    prompts = prompts_from_args(args, concepts)
    config = UceConfig(
        concepts=concepts,
        kind=args.kind,
        templates=prompts.templates,
        retain_prompts=prompts.retain,
        check_prompts=prompts.check,
        positions=args.positions,
        lam=args.lam,
        preserve_scale=args.retain_weight,
        seed=args.seed,
        device=args.device,
        name=args.name,
    )
    config.check()
    pipe = load_pipeline(args.model, args.dtype, args.device)
    result = erase_uce(pipe, config)
    patch_id = result.patch.save(args.output)
    targets, _ = config.prompt_pairs()
    summary = {
        "title": "UCE",
        "method": "uce",
        "concepts": [c.name for c in concepts],
        "seconds": round(result.seconds, 3),
        "cpu_seconds": round(result.cpu_seconds, 3),
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "prompts": len(targets),
        "pairs": result.pairs,
        "retain_source": prompts.retain_source,
        "patches": [
            {"path": args.output, "id": patch_id, "file_bytes": len(result.patch.to_bytes())}
        ],
        "layers": result.layers,
    }
    summary["verdicts"] = verdicts([result.checks], retained=bool(config.retain_prompts))
    print_report(summary)
    write_json(args.json_out, summary)
    return 0
