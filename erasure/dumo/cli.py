"""`conceptguard erase dumo`: train a DuMo eraser and write a unet_module patch."""

from __future__ import annotations

import argparse
from pathlib import Path

from erasure.cli_args import (
    add_output_arguments,
    add_prompt_arguments,
    add_retain_arguments,
    add_timestep_arguments,
    concepts_from_args,
    prompts_from_args,
    timesteps_from_args,
)
from erasure.dumo.config import DumoConfig
from erasure.prompts import PromptError


def add_parser(commands: argparse._SubParsersAction) -> None:
    dumo = commands.add_parser(
        "dumo",
        help="DuMo: an eraser on the U-Net's skip connections with time-layer modulation",
        description=(
            "Train a DuMo eraser (a copy of the U-Net's down path and mid block whose outputs "
            "are added to the frozen U-Net's skip connections, gated by the prompt and "
            "modulated per timestep and layer) and write a unet_module patch (module type "
            "dumo_epr). SD 1.x/2.x and SDXL U-Nets; Flux has no skip connections."
        ),
    )
    add_prompt_arguments(dumo)
    dumo.add_argument(
        "--width",
        type=float,
        default=DumoConfig.width,
        help="eraser channels as a fraction of the U-Net's (1: a full copy; less for large bases)",
    )
    dumo.add_argument("--steps", type=int, default=DumoConfig.steps, help="eraser steps")
    dumo.add_argument("--lr", type=float, default=DumoConfig.lr)
    dumo.add_argument("--eta", type=float, default=DumoConfig.eta)
    dumo.add_argument("--batch", type=int, default=DumoConfig.batch)
    dumo.add_argument("--tlmo-steps", type=int, default=DumoConfig.tlmo_steps)
    dumo.add_argument("--buckets", type=int, default=DumoConfig.buckets, help="TLMO buckets")
    dumo.add_argument("--no-gate", action="store_true", help="ablation: no prompt gate")
    dumo.add_argument("--no-tlmo", action="store_true", help="ablation: no TLMO fitting")
    dumo.add_argument(
        "--no-prior", action="store_true", help="ablation: a randomly initialised eraser"
    )
    dumo.add_argument(
        "--anchor-share",
        type=float,
        default=DumoConfig.anchor_share,
        help="share of each batch whose noisy states come from the anchored prompts' "
        f"trajectory (default {DumoConfig.anchor_share:g})",
    )
    dumo.add_argument("--sample-steps", type=int, default=DumoConfig.sample_steps)
    add_timestep_arguments(dumo, DumoConfig.t_range)
    dumo.add_argument("--resolution", type=int, help="training image side in pixels")
    dumo.add_argument(
        "--checkpoint",
        help="resume from / save progress to this path (.safetensors + .json), every "
        f"{DumoConfig.checkpoint_every} steps",
    )
    add_retain_arguments(
        dumo,
        prompts_help="unrelated prompts whose predictions the eraser must keep, one per line",
        weight_default=DumoConfig.retain_weight,
        weight_help=f"weight of the preservation term (default {DumoConfig.retain_weight:g})",
    )
    add_output_arguments(dumo)
    dumo.set_defaults(func=dumo_command)


def config_from_args(args: argparse.Namespace) -> tuple[DumoConfig, str]:
    concepts = concepts_from_args(args)
    prompts = prompts_from_args(args, concepts)
    config = DumoConfig(
        concepts=concepts,
        kind=args.kind,
        templates=prompts.templates,
        width=args.width,
        buckets=args.buckets,
        gate=not args.no_gate,
        prior=not args.no_prior,
        steps=args.steps,
        lr=args.lr,
        eta=args.eta,
        batch=args.batch,
        anchor_share=args.anchor_share,
        retain_prompts=prompts.retain,
        retain_weight=args.retain_weight,
        tlmo=not args.no_tlmo,
        tlmo_steps=args.tlmo_steps,
        check_prompts=prompts.check,
        sample_steps=args.sample_steps,
        t_range=timesteps_from_args(args),
        resolution=args.resolution,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        seed=args.seed,
        device=args.device,
        name=args.name,
    )
    return config, prompts.retain_source


def dumo_command(args: argparse.Namespace) -> int:
    from erasure.dumo.train import erase_dumo
    from patches.loading import load_pipeline

    config, retain_source = config_from_args(args)
    config.check()
    if not config.retain_prompts:
        raise PromptError("DuMo's preservation term needs retain prompts (omit `none`)")
    pipe = load_pipeline(args.model, args.dtype, args.device)
    result = erase_dumo(pipe, config)
    patch_id = result.patch.save(args.output)
    size = len(result.patch.to_bytes())
    r = result.report
    mib = result.peak_memory_bytes / 2**20
    gate = r["gate"]
    gate_line = (
        "prompt gate off"
        if gate["gate"] == "off"
        else f"prompt gate opens at similarity {gate['high']:.3f}, closed below "
        f"{gate['low']:.3f}" + ("" if gate["separable"] else " (concept and other prompts overlap)")
    )
    print(
        f"DuMo for {', '.join(c.name for c in config.concepts)}: {result.seconds:.1f} s, "
        f"peak memory {mib:.0f} MiB\n"
        f"  wrote {args.output}  {size / 2**20:.2f} MiB  id {patch_id[:16]}  "
        f"(eraser width {config.width:g}, {r['module_bytes'] / 2**20:.2f} MiB of tensors)\n"
        f"  noise-prediction shift: concept prompts {r['concept_eps_shift']:.4f}"
        + (f", held-out prompts {r['check_eps_drift']:.4f}" if "check_eps_drift" in r else "")
        + f" (relative)\n  {gate_line}; retain prompts: {retain_source}"
    )
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(
            Path(args.json_out),
            {
                "method": "dumo",
                "seconds": round(result.seconds, 3),
                "peak_memory_bytes": result.peak_memory_bytes,
                "peak_memory_kind": result.peak_memory_kind,
                "patch": {"path": args.output, "id": patch_id, "file_bytes": size},
                "report": r,
                "retain_source": retain_source,
            },
        )
    return 0
