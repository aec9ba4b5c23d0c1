"""`conceptguard bench hirm-cost`: seconds and memory of one HiRM patch on a CLIP-L-sized
text encoder (random weights: the cost depends on shapes, not on what the weights know).

Builds an SD-1.x-shaped pipeline whose text encoder has CLIP ViT-L/14's text configuration
(12 blocks, width 768, 77 tokens, 49,408-token vocabulary) and a tiny U-Net/VAE, then times
`erase_hirm` with its default settings, a few repetitions, on CPU or CUDA. The last patch is
then stored as rank-`--compress-rank` float16 deltas (`patch compress`): the bytes a registry
and a worker would hold per tenant instead of block 0 in float32.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch

CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def clip_l_pipeline(seed: int = 0, layers: int | None = None):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.tiny_pipelines import _ddim, _unet, _vae, byte_level_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer()
    config = CLIPTextConfig(
        **{**CLIP_L, **({"num_hidden_layers": layers} if layers else {})},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(config).eval(),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=768, attention_head_dim=8),
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main(argv: list[str] | None = None) -> int:
    from erasure.hirm import HirmConfig, erase_hirm
    from erasure.prompts import ConceptSpec

    parser = argparse.ArgumentParser(prog="conceptguard bench hirm-cost")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", default="S")
    parser.add_argument("--steps", type=int, help="fixed steps (default: HiRM's own stopping)")
    parser.add_argument("--layers", type=int, help="encoder blocks (default: CLIP-L's 12)")
    parser.add_argument(
        "--compress-rank", type=int, default=128, help="rank of the compressed patch's deltas"
    )
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    pipe = clip_l_pipeline(layers=args.layers).to(args.device)
    concept = ConceptSpec("van gogh", ("vincent van gogh",), "painting")
    seconds, reports, memory = [], [], []
    for repeat in range(args.repeats + 1):  # the first run warms up kernels and allocators
        config = HirmConfig(
            [concept], variant=args.variant, kind="style", device=args.device, steps=args.steps
        )
        result = erase_hirm(pipe, config)
        if repeat:
            seconds.append(result.seconds)
            reports.append(result.reports[0])
            memory.append(result.peak_memory_bytes)
    from patches.compress import compress_patch

    compressed, compression = compress_patch(result.patches[0], pipe, args.compress_rank)
    summary = {
        "encoder": "CLIP-L text configuration, random weights"
        + (f", {args.layers} blocks" if args.layers else ""),
        "trained_parameters": reports[0]["trained_parameters"],
        "prompts": reports[0]["prompts"],
        "steps": reports[0].get("steps", args.steps),
        "variant": args.variant,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "seconds_median": statistics.median(seconds),
        "peak_memory_bytes": max(memory),
        "peak_memory_kind": result.peak_memory_kind,
        "patch_bytes": len(result.patches[0].to_bytes()),
        "compressed_patch_bytes": len(compressed.to_bytes()),
        "compressed_rank": args.compress_rank,
        "compressed_max_error": compression.max_error,
    }
    print(
        f"HiRM-{args.variant} on a CLIP-L-sized encoder ({args.device}): median "
        f"{summary['seconds_median']:.2f} s over {len(seconds)} runs "
        f"({', '.join(f'{s:.2f}' for s in seconds)}), peak memory "
        f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB ({summary['peak_memory_kind']}), "
        f"patch {summary['patch_bytes'] / 2**20:.1f} MiB "
        f"({summary['compressed_patch_bytes'] / 2**20:.1f} MiB as rank-{args.compress_rank} "
        "float16 deltas), "
        f"{summary['trained_parameters'] / 1e6:.2f}M trained parameters, "
        f"{summary['prompts']} prompts x {summary['steps']} steps"
    )
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
