"""Throughput with 1 tenant vs 16 tenants, each with its own text-encoder patch.

    python -m bench.serve_throughput [--model PATH] [--requests 64] [--clients 16] [--rounds 3]

One server (loopback only) holds 16 tenants, each assigned a distinct text_encoder patch.
The same request mix is sent twice per round: all from one tenant, then spread over the 16
(round robin), alternating to cancel drift on a shared machine. Reported: images/s of each
(median over rounds), their ratio (goal >= 0.95 on CPU with the MiniCanvas model), the
workers' stage times per phase (from /metrics), the memory a tenant's stack holds (the
edited tensors, exactly, and the growth of the workers' RSS once all 16 were built), and
plain diffusers in one process at the server's batch size as a reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from server.config import COMPILE_MODES

TENANTS = [f"t{i:02d}" for i in range(16)]
PROMPTS = ["a red circle", "a blue square on grass", "two green triangles", "a yellow star"]


def _phase(server, tenants: list[str], args: argparse.Namespace) -> dict[str, float]:
    from bench.serve_harness import timed_phase

    jobs = [
        (tenants[i % len(tenants)], {"prompt": PROMPTS[i % 4], "seed": i, "steps": args.steps})
        for i in range(args.requests)
    ]
    result = timed_phase(server, jobs, args.clients)
    del result["records"]
    return result


def _plain_diffusers(model: str, args: argparse.Namespace) -> float:
    """Images/s of the stock pipeline, one process, one call per batch of the server's size."""
    import torch

    from patches.loading import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        pipe = load_pipeline(model, args.dtype, args.device)
        pipe.set_progress_bar_config(disable=True)
        if args.compile != "off":  # what a user compiling the stock pipeline would do
            from server.compiled import BACKEND

            mode = None if args.compile == "default" else args.compile
            pipe.unet = torch.compile(pipe.unet, mode=mode, backend=BACKEND)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, backend=BACKEND)
        prompts = [PROMPTS[i % 4] for i in range(args.batch)]
        pipe(prompts, num_inference_steps=args.steps, output_type="pil")  # warm-up
        started, images = time.perf_counter(), 0
        while images < args.requests:
            images += len(pipe(prompts, num_inference_steps=args.steps, output_type="pil").images)
        return images / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serve_harness import rss_bytes, start_bench_server
    from bench.synthetic_patches import noise_patch
    from patches.loading import load_pipeline
    from patches.stacks import compose_weight_stack
    from server.default_model import default_model_path
    from server.text_encoding import build_text_plan

    model = args.model or str(default_model_path())
    pipe = load_pipeline(model, args.dtype)
    patches = [noise_patch(pipe, seed=200 + i) for i in range(len(TENANTS))]
    plan_bytes = build_text_plan(pipe, compose_weight_stack(pipe, patches[:1])).nbytes
    del pipe
    extra = ["--device", args.device, "--dtype", args.dtype, "--compile", args.compile]
    with tempfile.TemporaryDirectory(prefix="cg-serve-throughput-") as folder:
        batching = {"max_batch_size": args.batch, "batch_timeout_s": 0.05}
        server = start_bench_server(Path(folder), model, TENANTS, args.workers, batching, extra)
        try:
            warm = argparse.Namespace(**{**vars(args), "requests": 2 * args.batch})
            _phase(server, TENANTS, warm)  # every tenant on the base model: nothing built
            workers = server.worker_pids()
            rss_before = sum(rss_bytes(pid) for pid in workers)
            for tenant, patch in zip(TENANTS, patches, strict=True):
                server.push(patch.to_bytes(), f"tp-{tenant}")
                server.assign(tenant, [patch.id])
            _phase(server, TENANTS, warm)  # builds every stack on the workers that see them
            rss_after = sum(rss_bytes(pid) for pid in workers)
            rounds = []
            for _ in range(args.rounds):
                one = _phase(server, TENANTS[:1], args)
                many = _phase(server, TENANTS, args)
                rounds.append({"one_tenant": one, "sixteen_tenants": many})
        finally:
            server.stop()
    ips_one = statistics.median(r["one_tenant"]["images_per_s"] for r in rounds)
    ips_many = statistics.median(r["sixteen_tenants"]["images_per_s"] for r in rounds)
    result = {
        "model": model,
        "device": args.device,
        "dtype": args.dtype,
        "workers": args.workers,
        "max_batch_size": args.batch,
        "clients": args.clients,
        "requests_per_phase": args.requests,
        "steps": args.steps,
        "compile": args.compile,
        "images_per_s_1_tenant": round(ips_one, 3),
        "images_per_s_16_tenants": round(ips_many, 3),
        "ratio_16_over_1": round(ips_many / ips_one, 4),
        "tenant_stack_bytes": plan_bytes,
        "worker_rss_growth_per_tenant_bytes": round((rss_after - rss_before) / len(TENANTS)),
        "rounds": rounds,
    }
    if args.plain:
        result["plain_diffusers_images_per_s"] = round(_plain_diffusers(model, args), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers folder (default: the embedded model)")
    parser.add_argument("--requests", type=int, default=64, help="requests per phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="max batch size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --plain")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="serve with `serve --compile MODE`, and compile --plain's U-Net and VAE decoder "
        "the same way",
    )
    parser.add_argument(
        "--plain", action="store_true", help="also time plain diffusers in this process"
    )
    parser.add_argument(
        "--json",
        "--out",
        dest="json_out",
        default="docs/results/serve_throughput.json",
        help="write the result here (--out: its former name)",
    )
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(f"{'phase':<14} {'img/s':>8} {'text enc/batch':>15} {'denoise/batch':>14} {'batches':>8}")
    for name in ("one_tenant", "sixteen_tenants"):
        phase = {
            key: statistics.median(r[name][key] for r in result["rounds"])
            for key in result["rounds"][0][name]
        }
        print(
            f"{name:<14} {phase['images_per_s']:>8.2f} {phase['text_encode_s_per_batch']:>14.4f}s"
            f" {phase['denoise_s_per_batch']:>13.4f}s {phase['batches']:>8.0f}"
        )
    print(f"ratio 16/1: {result['ratio_16_over_1']}")
    print(f"held per tenant: {result['tenant_stack_bytes']} bytes (edited tensors)")
    print(f"worker RSS growth per tenant: {result['worker_rss_growth_per_tenant_bytes']} bytes")
    if "plain_diffusers_images_per_s" in result:
        print(
            f"plain diffusers, batch {args.batch}: {result['plain_diffusers_images_per_s']} img/s"
        )
    print(f"written to {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
