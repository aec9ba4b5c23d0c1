"""`conceptguard bench closed-form-cost`: seconds and memory of one UCE patch and one ErasePro
patch (text and U-Net chains) on an SD-1.5-shaped pipeline (random weights: the cost depends
on shapes, not on what the weights know).

The pipeline has CLIP ViT-L/14's text configuration (12 blocks, width 768, MLP 3072, 77
tokens) and SD 1.5's U-Net configuration (16 cross-attention key/value projections, 768 ->
320/640/1280), a byte-level tokenizer and a tiny VAE. Each method runs with its CLI defaults
on one style concept with 8 templates x 2 words and the built-in general retain set, a few
repetitions after a warm-up, on CPU or CUDA. Published (ErasePro's paper, GPU unstated):
ErasePro 15.71 s, UCE 3.48 s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch

SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "sample_size": 64,
}


def sd15_pipeline(seed: int = 0):
    from diffusers import UNet2DConditionModel

    from bench.hirm_cost import clip_l_pipeline

    pipe = clip_l_pipeline(seed)
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel(**SD15_UNET).eval()
    return pipe


def _run(pipe, method: str, device: str, blocks: tuple[int, ...] | None = None):
    from erasure.default_prompts import general_prompts
    from erasure.erasepro import EraseProConfig, erase_erasepro
    from erasure.prompts import ConceptSpec
    from erasure.uce import UceConfig, erase_uce

    concept = [ConceptSpec("van gogh", ("vincent van gogh",), "painting")]
    settings = dict(kind="style", retain_prompts=tuple(general_prompts()), device=device)
    if method == "uce":
        result = erase_uce(pipe, UceConfig(concept, **settings))
        return result, [result.patch]
    chain = method.removeprefix("erasepro-")
    if blocks:
        settings["blocks"] = blocks
    result = erase_erasepro(pipe, EraseProConfig(concept, chain=chain, **settings))
    return result, result.patches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conceptguard bench closed-form-cost")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--methods", default="uce,erasepro-text,erasepro-unet", help="comma-separated"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny SD pipeline instead (a smoke run: gpu-suite)"
    )
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    if args.tiny:
        from bench.tiny_pipelines import BUILDERS

        pipe, model = BUILDERS["sd"](0), "tiny SD pipeline, random weights (a smoke run)"
    else:
        pipe = sd15_pipeline()
        model = "SD-1.5-shaped: CLIP-L text configuration, SD 1.5 U-Net, random weights"
    pipe = pipe.to(args.device)
    summary = {
        "model": model,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "methods": {},
    }
    for method in args.methods.split(","):
        seconds, cpu, memory = [], [], []
        for repeat in range(args.repeats + 1):  # the first run warms up kernels and allocators
            result, made = _run(pipe, method, args.device, (0, 1) if args.tiny else None)
            if repeat:
                seconds.append(result.seconds)
                cpu.append(result.cpu_seconds)
                memory.append(result.peak_memory_bytes)
        summary["methods"][method] = {
            "seconds": seconds,
            "seconds_median": statistics.median(seconds),
            "cpu_seconds": cpu,
            "peak_memory_bytes": max(memory),
            "peak_memory_kind": result.peak_memory_kind,
            "patch_bytes": sum(len(p.to_bytes()) for p in made),
            "pairs": result.pairs,
            "layers": result.layers,
        }
        ranks = [row.get("rank", row["constraints"]) for row in result.layers]
        print(
            f"{method} on the {'tiny' if args.tiny else 'SD-1.5-shaped'} model "
            f"({args.device}): median "
            f"{statistics.median(seconds):.2f} s over {len(seconds)} runs "
            f"({', '.join(f'{s:.2f}' for s in seconds)}; CPU time "
            f"{', '.join(f'{s:.2f}' for s in cpu)}), peak memory "
            f"{max(memory) / 2**20:.0f} MiB ({result.peak_memory_kind}), "
            f"{len(result.layers)} layers, rank {min(ranks)}-{max(ranks)}, "
            f"{result.pairs} aligned token pairs"
        )
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
