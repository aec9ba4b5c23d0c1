"""`conceptguard bench unet-switch`: what U-Net LoRA stacks cost a serving worker.

1. Switching: a worker holding two tenants' ESD-x adapters (real ESD patches, few training
   steps: the cost depends on which layers carry adapters, not on what they erased) switches
   its U-Net between stack A, stack B and no stack, as batches of different tenants arrive;
   each switch is timed (median, p99, max).
2. Stack-less tenants: images per second of plain generations (a) on a worker that never
   loaded an adapter and (b) on one with both adapters loaded and switched off; reported as
   the ratio (b)/(a), interleaved repetitions, median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.erasure_settings import esd_config
    from erasure.esd import erase_esd
    from server.default_model import default_model_path
    from server.unet_adapters import UnetAdapters

    parser = argparse.ArgumentParser(prog="conceptguard bench unet-switch")
    parser.add_argument("--model", default=None, help="default: the MiniCanvas model")
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as a worker")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = args.model or str(default_model_path())
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    plain = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    stacks = []
    for concept in ("circle", "star"):
        config = esd_config([concept], "x", steps=3)
        stacks.append(erase_esd(pipe, config).patch)
    adapters = UnetAdapters(pipe)
    adapters.prepare(stacks)
    order = [(stacks[0].id,), (stacks[1].id,), ()]
    switch_ms = []
    for i in range(args.switches):
        switch_ms.append(1000 * adapters.activate(order[i % 3]))
    print(
        f"switch between U-Net stacks ({len(order)} states, {args.switches} switches): median "
        f"{statistics.median(switch_ms):.2f} ms, p99 {_percentile(switch_ms, 0.99):.2f} ms, "
        f"max {max(switch_ms):.2f} ms"
    )

    prompts = [f"a drawing of a heart in {s} style" for s in ("neon", "dots")] * (args.batch // 2)

    def images_per_second(p) -> float:
        started = time.perf_counter()
        p(
            prompts,
            num_inference_steps=args.steps,
            generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
            output_type="np",
        )
        return len(prompts) / (time.perf_counter() - started)

    adapters.activate(())
    images_per_second(plain), images_per_second(pipe)  # warm-up
    ratios, base_rates, loaded_rates = [], [], []
    for _ in range(args.repeats):
        base_rate = images_per_second(plain)
        loaded_rate = images_per_second(pipe)
        base_rates.append(base_rate)
        loaded_rates.append(loaded_rate)
        ratios.append(loaded_rate / base_rate)
    summary = {
        "model": model,
        "threads": args.threads,
        "adapted_modules_per_stack": stacks[0].manifest.eval["unet"]["adapted_modules"],
        "switch_ms": {
            "median": statistics.median(switch_ms),
            "p99": _percentile(switch_ms, 0.99),
            "max": max(switch_ms),
            "switches": args.switches,
        },
        "stackless": {
            "batch": len(prompts),
            "steps": args.steps,
            "plain_images_per_s": statistics.median(base_rates),
            "adapters_loaded_images_per_s": statistics.median(loaded_rates),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
        },
    }
    print(
        f"stack-less generation, {len(prompts)} images x {args.steps} steps: plain "
        f"{summary['stackless']['plain_images_per_s']:.1f} img/s, with 2 adapters loaded "
        f"(off) {summary['stackless']['adapters_loaded_images_per_s']:.1f} img/s, ratio "
        f"{summary['stackless']['ratio']:.3f} (median of {args.repeats})"
    )
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
