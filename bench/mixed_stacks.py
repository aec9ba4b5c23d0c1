"""`conceptguard bench mixed-stacks`: what per-row denoiser patches cost a serving worker.

One server (loopback only), the same request mix in three phases, alternated every round to
cancel drift on a shared machine:
  (a) one tenant holding one U-Net LoRA patch (ESD-x shaped: cross-attention, rank 4);
  (b) 16 tenants, each holding a distinct one (ranks 1-4);
  (c) 16 tenants mixing a HiRM-shaped text-encoder patch, a LoRA, both, and none;
  (d) one tenant holding a DuMo eraser (a unet_module: every row carries the module);
  (e) 16 tenants, half of them holding a DuMo eraser (the module runs on their rows only).
Reported: images/s per phase (median over rounds), the ratios to (a), denoiser calls per
diffusion step of every batch (from each response's record: 1.0 when every tenant's
patches share one call), and the memory an adapter slot holds in a worker.

    conceptguard bench mixed-stacks --json docs/results/mixed_stacks_cpu.json
    conceptguard bench mixed-stacks --sd15-shaped /tmp/sd15 --device cuda --dtype float16 \
        --steps 25 --batch 16 --workers 1 --json mixed_stacks_gpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

PHASES = {
    "a_one_tenant_one_lora": "one tenant, one LoRA",
    "b_16_tenants_distinct_loras": "16 tenants, distinct LoRAs",
    "c_16_tenants_mixed": "16 tenants: HiRM, LoRA, both, none",
    "d_one_tenant_dumo": "one tenant, a DuMo module",
    "e_16_tenants_half_dumo": "16 tenants, 8 with a DuMo module",
}
LORA_TENANTS = [f"l{i:02d}" for i in range(16)]
MIXED_TENANTS = [f"m{i:02d}" for i in range(16)]
MODULE_TENANTS = [f"d{i:02d}" for i in range(16)]
PROMPTS = [
    "a drawing of a circle in neon style",
    "a square in dots style",
    "a star on a checker pattern",
    "a heart in watercolor style",
]


def _patches(pipe) -> dict[str, list]:
    """Each tenant's stack: real patch files with seeded noise where a method would edit."""
    from bench.synthetic_patches import dumo_noise_patch, lora_noise_patch, noise_patch

    loras = [lora_noise_patch(pipe, seed=100 + i, rank=1 + i % 4) for i in range(16)]
    texts = [noise_patch(pipe, seed=200 + i) for i in range(16)]
    stacks = {tenant: [lora] for tenant, lora in zip(LORA_TENANTS, loras, strict=True)}
    for i, tenant in enumerate(MIXED_TENANTS):
        stacks[tenant] = [[texts[i]], [loras[i]], [texts[i], loras[i]], []][i % 4]
    modules = [dumo_noise_patch(pipe, seed=300 + i) for i in range(8)]
    for i, tenant in enumerate(MODULE_TENANTS):
        stacks[tenant] = [modules[i // 2]] if i % 2 == 0 else [loras[i]]
    return stacks


def _slot_memory(pipe, stacks: dict[str, list]) -> dict[str, Any]:
    """What a worker's per-row denoiser holds for the phase-(b) adapters."""
    from server.denoiser_routing import DenoiserRouter

    router = DenoiserRouter(pipe)
    prepared = [router.prepare(stacks[t]) for t in LORA_TENANTS]
    return {
        **router.memory(),
        "adapted_layers": len(router.layers),
        "factor_bytes_per_stack": statistics.median(s.nbytes for s in prepared),
    }


def _calls_per_step(records: list[dict[str, Any]], steps: int) -> dict[str, float]:
    batches = {(r["worker"], r["batch_started_at"]): r["denoiser_calls"] for r in records}
    per_step = [calls / steps for calls in batches.values()]
    return {"max": max(per_step), "mean": statistics.fmean(per_step), "batches": len(per_step)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serve_harness import start_bench_server, timed_phase
    from patches.loading import load_pipeline
    from server.default_model import default_model_path

    if args.sd15_shaped:
        from bench.sd15_shaped import save_sd15_shaped

        model = str(save_sd15_shaped(args.sd15_shaped, args.dtype))
    else:
        model = args.model or str(default_model_path())
    count = len(LORA_TENANTS) + len(MIXED_TENANTS) + len(MODULE_TENANTS)
    print(f"model {model}; making {count} tenants' patches")
    pipe = load_pipeline(model, args.dtype)
    stacks = _patches(pipe)
    memory = _slot_memory(pipe, stacks)
    del pipe
    phase_tenants = {
        "a_one_tenant_one_lora": LORA_TENANTS[:1],
        "b_16_tenants_distinct_loras": LORA_TENANTS,
        "c_16_tenants_mixed": MIXED_TENANTS,
        "d_one_tenant_dumo": MODULE_TENANTS[:1],
        "e_16_tenants_half_dumo": MODULE_TENANTS,
    }

    def jobs(tenants: list[str]) -> list[tuple[str, dict[str, Any]]]:
        return [
            (tenants[i % len(tenants)], {"prompt": PROMPTS[i % 4], "seed": i, "steps": args.steps})
            for i in range(args.requests)
        ]

    extra = ["--device", args.device, "--dtype", args.dtype]
    batching = {"max_batch_size": args.batch, "batch_timeout_s": 0.05}
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cg-mixed-stacks-") as folder:
        tenants = LORA_TENANTS + MIXED_TENANTS + MODULE_TENANTS
        server = start_bench_server(Path(folder), model, tenants, args.workers, batching, extra)
        try:
            pushed: dict[str, str] = {}
            for tenant in tenants:
                for patch in stacks[tenant]:
                    if patch.id not in pushed:
                        pushed[patch.id] = server.push(patch.to_bytes(), f"p{len(pushed)}")["id"]
                server.assign(tenant, [p.id for p in stacks[tenant]])
            print("warm-up: every worker builds every stack")
            for name in PHASES:
                timed_phase(server, jobs(phase_tenants[name]), args.clients)
            for index in range(args.rounds):
                measured = {}
                for name in PHASES:
                    phase = timed_phase(server, jobs(phase_tenants[name]), args.clients)
                    phase["denoiser_calls_per_step"] = _calls_per_step(
                        phase.pop("records"), args.steps
                    )
                    measured[name] = phase
                rounds.append(measured)
                print(
                    f"round {index + 1}/{args.rounds}: "
                    + ", ".join(
                        f"{n[0]} {p['images_per_s']:.2f} img/s" for n, p in measured.items()
                    )
                )
        finally:
            server.stop()
    median = {name: statistics.median(r[name]["images_per_s"] for r in rounds) for name in PHASES}
    base = median["a_one_tenant_one_lora"]
    return {
        "model": model,
        "device": args.device,
        "dtype": args.dtype,
        "workers": args.workers,
        "max_batch_size": args.batch,
        "clients": args.clients,
        "requests_per_phase": args.requests,
        "steps": args.steps,
        "images_per_s": median,
        "ratio_b_over_a": round(median["b_16_tenants_distinct_loras"] / base, 4),
        "ratio_c_over_a": round(median["c_16_tenants_mixed"] / base, 4),
        "ratio_d_over_a": round(median["d_one_tenant_dumo"] / base, 4),
        "ratio_e_over_a": round(median["e_16_tenants_half_dumo"] / base, 4),
        "denoiser_calls_per_step_max": max(
            r[n]["denoiser_calls_per_step"]["max"] for r in rounds for n in PHASES
        ),
        "adapter_slots": memory,
        "rounds": rounds,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'phase':<40} {'img/s':>8} {'calls/step':>11}")
    for name, label in PHASES.items():
        calls = max(r[name]["denoiser_calls_per_step"]["max"] for r in result["rounds"])
        print(f"({name[0]}) {label:<36} {result['images_per_s'][name]:>8.2f} {calls:>11.2f}")
    ratios = ", ".join(f"({x})/(a) {result[f'ratio_{x}_over_a']}" for x in "bcde")
    print(f"ratios: {ratios}")
    memory = result["adapter_slots"]
    print(
        f"adapter slots: {memory['slots']} x {memory['bytes_per_slot']} bytes over "
        f"{memory['adapted_layers']} layers; one stack's factors: "
        f"{memory['factor_bytes_per_stack']} bytes"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conceptguard bench mixed-stacks", description=__doc__)
    parser.add_argument("--model", help="diffusers folder (default: the embedded model)")
    parser.add_argument(
        "--sd15-shaped",
        metavar="DIR",
        help="serve an SD-1.5-shaped pipeline with random weights, built into DIR once",
    )
    parser.add_argument("--requests", type=int, default=64, help="requests per phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="max batch size")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--json", dest="json_out", help="write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), result)
        print(f"written to {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
