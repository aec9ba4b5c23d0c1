"""`conceptguard erase esd`: train an ESD LoRA patch for the U-Net."""

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
from erasure.esd.config import EsdConfig
from erasure.verdict import judge_patch


def add_parser(commands: argparse._SubParsersAction) -> None:
    esd = commands.add_parser(
        "esd",
        help="ESD as a U-Net LoRA (x: cross-attention, u: the rest)",
        description=(
            "Train an ESD LoRA (negative-guidance objective) and write a unet_lora patch whose "
            "tensors use the diffusers/peft LoRA key format, so `pipe.load_lora_weights(file)` "
            "loads it too. SD 1.x/2.x and SDXL (U-Net) and Flux (transformer) pipelines."
        ),
    )
    add_prompt_arguments(esd)
    esd.add_argument("--mode", choices=("x", "u"), default="x")
    esd.add_argument("--rank", type=int, default=EsdConfig.rank)
    esd.add_argument("--steps", type=int, default=EsdConfig.steps)
    esd.add_argument(
        "--lr",
        type=float,
        help="Adam step size (default: 0.1 / the adapted layers' mean input width)",
    )
    esd.add_argument(
        "--eta",
        type=float,
        help="negative guidance strength (default: 1 without --anchor, the published ESD; "
        "0 with one: the anchored prompt's prediction is the target)",
    )
    esd.add_argument("--batch", type=int, default=EsdConfig.batch)
    esd.add_argument("--sample-steps", type=int, default=EsdConfig.sample_steps)
    add_timestep_arguments(esd, EsdConfig.t_range)
    esd.add_argument(
        "--resolution",
        type=int,
        help="training image side in pixels (default: the model's; Flux 512)",
    )
    add_retain_arguments(
        esd,
        prompts_help="unrelated prompts whose predictions the LoRA must keep, one per line "
        "(a preservation term beyond the published ESD; off without this)",
        weight_default=EsdConfig.retain_weight,
        weight_help=f"weight of the preservation term (default {EsdConfig.retain_weight:g})",
    )
    add_output_arguments(esd)
    esd.set_defaults(func=esd_command)


def config_from_args(args: argparse.Namespace) -> tuple[EsdConfig, str]:
    """The run's config and where its retain prompts came from."""
    concepts = concepts_from_args(args)
    prompts = prompts_from_args(args, concepts)
    config = EsdConfig(
        concepts=concepts,
        mode=args.mode,
        kind=args.kind,
        templates=prompts.templates,
        rank=args.rank,
        steps=args.steps,
        lr=args.lr,
        eta=args.eta,
        batch=args.batch,
        sample_steps=args.sample_steps,
        t_range=timesteps_from_args(args),
        resolution=args.resolution,
        retain_prompts=prompts.retain,
        check_prompts=prompts.check,
        retain_weight=args.retain_weight,
        seed=args.seed,
        device=args.device,
        name=args.name,
    )
    return config, prompts.retain_source


def esd_command(args: argparse.Namespace) -> int:
    from erasure.esd import erase_esd
    from patches.loading import load_pipeline

    config, retain_source = config_from_args(args)
    config.check()
    pipe = load_pipeline(args.model, args.dtype, args.device)
    result = erase_esd(pipe, config)
    patch_id = result.patch.save(args.output)
    size = len(result.patch.to_bytes())
    mib = result.peak_memory_bytes / 2**20
    label = "GPU allocated" if result.peak_memory_kind == "cuda_allocated" else "process RSS"
    r = result.report
    print(
        f"ESD-{config.mode} for {', '.join(c.name for c in config.concepts)}: "
        f"{result.seconds:.2f} s, peak memory {mib:.0f} MiB ({label})\n"
        f"  wrote {args.output}  {size / 1024:.1f} KiB  id {patch_id[:16]}  "
        f"{r['adapted_modules']} modules, rank {config.rank}\n"
        f"  loss {r['loss_first']:.5f} -> {r['loss_last']:.5f}; noise-prediction shift: "
        f"concept prompts {r['concept_eps_shift']:.4f}, concept-free prompts "
        f"{r['retain_eps_drift']:.4f} (relative)"
        + (
            f"; retain prompts {r['retain_set_eps_drift']:.4f}"
            if "retain_set_eps_drift" in r
            else ""
        )
        + f"\n  {r['prompts']} concept prompts ("
        + ("anchored target" if any(c.anchor for c in config.concepts) else "published target")
        + f"), {config.steps} steps at lr {r['lr']:.2e}; retain prompts: {retain_source}"
    )
    verdict = judge_patch(
        r.get("check_drift", {}), r["concept_eps_shift"], retained=bool(config.retain_prompts)
    )
    print("\n".join(verdict.lines()))
    if args.json_out:
        from patches.atomic import atomic_write_json

        summary = {
            "method": f"esd-{config.mode}",
            "seconds": round(result.seconds, 3),
            "peak_memory_bytes": result.peak_memory_bytes,
            "peak_memory_kind": result.peak_memory_kind,
            "patch": {"path": args.output, "id": patch_id, "file_bytes": size},
            "report": r,
            "retain_source": retain_source,
            "verdict": verdict.to_dict(),
        }
        atomic_write_json(Path(args.json_out), summary)
    return 0
