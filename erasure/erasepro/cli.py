"""`conceptguard erase erasepro`: zero-residual closed-form edits along a chain of layers."""

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
from erasure.erasepro.config import CHAINS, TARGETS, EraseProConfig
from erasure.prompts import PromptError
from erasure.token_pairs import POSITION_SETS


def add_parser(commands: argparse._SubParsersAction) -> None:
    erasepro = commands.add_parser(
        "erasepro",
        help="ErasePro: zero-residual closed-form edits, shallow to deep",
        description=(
            "ErasePro: along a chain of layers, from shallow to deep, each layer is edited so "
            "that the concept prompts' aligned token inputs (recomputed through the layers "
            "already edited) give exactly the original layer's output for the anchor prompts, "
            "with the least change. --chain text edits mlp.fc2 of text-encoder blocks (a "
            "text_encoder patch per encoder; SDXL gets two files); --chain unet edits the "
            "denoiser's text key/value projections (a unet_lora patch of exact factors). "
            "Every --concept needs an --anchor."
        ),
    )
    add_prompt_arguments(erasepro)
    add_retain_arguments(
        erasepro,
        prompts_help="prompts whose inputs the change should avoid, one per line",
        weight_default=EraseProConfig.preserve_weight,
        weight_help="weight of the retain prompts in the change's metric (default "
        f"{EraseProConfig.preserve_weight:g}; 0: the plain Frobenius norm of METHODS.md)",
    )
    erasepro.add_argument("--chain", choices=CHAINS, default=EraseProConfig.chain)
    erasepro.add_argument(
        "--layers",
        default=",".join(map(str, EraseProConfig.blocks)),
        help="text chain: the blocks whose mlp.fc2 form the chain, shallow to deep "
        "(default %(default)s); the unet chain edits every text key/value projection",
    )
    erasepro.add_argument(
        "--target",
        choices=TARGETS,
        default=EraseProConfig.target,
        help="text chain: stream (the block's output at each aligned token becomes the "
        "anchor's; default) or layer (the layer's own output does, METHODS.md as written)",
    )
    erasepro.add_argument(
        "--rcond",
        type=float,
        default=EraseProConfig.rcond,
        help="principal combinations of the aligned tokens imposed exactly: singular values "
        "above this fraction of the largest (default %(default)s)",
    )
    erasepro.add_argument(
        "--positions",
        choices=POSITION_SETS,
        default="all",
        help="aligned tokens: the concept's only, through the end token, or through the "
        "padding too (default all: the denoiser reads every position)",
    )
    add_output_arguments(erasepro)
    erasepro.set_defaults(func=erasepro_command)


def config_from_args(args: argparse.Namespace) -> tuple[EraseProConfig, str]:
    """The run's config and where its retain prompts came from."""
    try:
        blocks = tuple(int(b) for b in args.layers.split(","))
    except ValueError:
        raise PromptError(f"--layers takes block indices like 0,1,2, not {args.layers!r}") from None
    concepts = concepts_from_args(args)
    prompts = prompts_from_args(args, concepts)
    config = EraseProConfig(
        concepts=concepts,
        kind=args.kind,
        templates=prompts.templates,
        retain_prompts=prompts.retain,
        check_prompts=prompts.check,
        positions=args.positions,
        chain=args.chain,
        blocks=blocks,
        target=args.target,
        preserve_weight=args.retain_weight,
        rcond=args.rcond,
        seed=args.seed,
        device=args.device,
        name=args.name,
    )
    return config, prompts.retain_source


def erasepro_command(args: argparse.Namespace) -> int:
    from erasure.closed_form_report import print_report, verdicts, write_json
    from erasure.erasepro import erase_erasepro
    from erasure.hirm.cli import output_paths
    from patches.loading import load_pipeline

    config, retain_source = config_from_args(args)
    config.check()
    pipe = load_pipeline(args.model, args.dtype, args.device)
    result = erase_erasepro(pipe, config)
    paths = output_paths(Path(args.output), [p.manifest.target.component for p in result.patches])
    written = []
    for patch, path in zip(result.patches, paths, strict=True):
        patch_id = patch.save(path)
        written.append({"path": str(path), "id": patch_id, "file_bytes": len(patch.to_bytes())})
    targets, _ = config.prompt_pairs()
    summary = {
        "title": f"ErasePro ({config.chain} chain)",
        "method": "erasepro",
        "chain": config.chain,
        "concepts": [c.name for c in config.concepts],
        "seconds": round(result.seconds, 3),
        "cpu_seconds": round(result.cpu_seconds, 3),
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "prompts": len(targets),
        "pairs": result.pairs,
        "retain_source": retain_source,
        "patches": written,
        "layers": result.layers,
        "readouts": result.readouts,
    }
    summary["verdicts"] = verdicts(result.checks, retained=bool(config.retain_prompts))
    print_report(summary)
    write_json(args.json_out, summary)
    return 0
