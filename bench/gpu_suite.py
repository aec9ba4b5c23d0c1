"""`conceptguard bench gpu-suite`: every GPU figure the issues ask for, as one command.

On a GPU machine (the device tool: `bash bench/gpu/device_bench.sh` runs this after
installing the carried wheels) it builds an SD-1.5-shaped pipeline with random weights
(bench/sd15_shaped.py) and runs, each as its own `conceptguard bench` process:
- serve-throughput with --plain: plain diffusers at the server's batch size, the server
  with 1 tenant and with 16 tenants holding distinct text-encoder patches;
- mixed-stacks: 16 tenants' distinct U-Net LoRAs (and the mixed and DuMo phases) against one;
- serve-throughput --compile default --plain: the same with the server's compiled path
  (serve --compile) against the stock pipeline with its U-Net and VAE decoder compiled;
- hirm-cost: one HiRM patch on a CLIP-L-sized encoder, and its compressed bytes;
- closed-form-cost: one UCE and one ErasePro (text chain) patch on the SD-1.5-shaped model.
It then checks the figures against the goals (issues 12 and 18) and writes one JSON
(figures, goals, pass/fail) plus each benchmark's own JSON and log under --out.

`--tiny` runs the same commands on this CPU with the MiniCanvas model and tiny budgets (and
dynamo's eager backend for the compiled run: tracing without code generation): it proves
the suite runs end to end (CI does), its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Goal:
    name: str
    figure: str  # "file.json:key" or a derived name
    op: str  # ">=" or "<="
    value: float


GOALS = (
    Goal("server, 16 tenants / plain diffusers (goal 1.5)", "server_over_plain", ">=", 1.3),
    Goal("server, 16 tenants / plain + torch.compile", "server_over_plain_compiled", ">=", 0.95),
    Goal("server, 16 tenants / 1 tenant (issue 18)", "ratio_16_over_1", ">=", 0.97),
    Goal("per-row LoRAs (b)/(a) (issue 12)", "ratio_b_over_a", ">=", 0.97),
    Goal("HiRM-S on CLIP-L, seconds (issue 18)", "hirm_seconds", "<=", 1.2),
    Goal("HiRM-S on CLIP-L, compressed patch MB (issue 18)", "hirm_compressed_mb", "<=", 4.0),
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="conceptguard bench gpu-suite", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="folder for the JSON results and logs")
    parser.add_argument("--tiny", action="store_true", help="a CPU smoke run (MiniCanvas)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    return parser.parse_args(argv)


def _plan(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str]]]:
    """(name, conceptguard arguments) per benchmark."""
    if args.tiny:
        device = ["--device", "cpu", "--dtype", "float32"]
        load = ["--steps", "2", "--batch", "4", "--workers", "1", "--requests", "8"]
        model: list[str] = []
        sd15: list[str] = []
        hirm = ["--device", "cpu", "--repeats", "1", "--steps", "1", "--layers", "2"]
        closed_form = ["--device", "cpu", "--tiny"]
    else:
        device = ["--device", args.device, "--dtype", args.dtype]
        load = ["--steps", str(args.steps), "--batch", str(args.batch), "--workers", "1"]
        load += ["--requests", str(4 * args.batch)]
        model = ["--model", str(out / "sd15")]
        sd15 = ["--sd15-shaped", str(out / "sd15")]
        hirm = ["--device", args.device, "--repeats", "3"]
        closed_form = ["--device", args.device]
    rounds = ["--rounds", "1" if args.tiny else "2"]
    throughput = ["serve-throughput", *model, *device, *load, *rounds, "--plain"]
    return [
        # mixed-stacks first: it builds the SD-1.5-shaped folder serve-throughput then serves.
        ("mixed_stacks", ["mixed-stacks", *(sd15 or model), *device, *load, *rounds]),
        ("serve_throughput", throughput),
        ("serve_throughput_compiled", [*throughput, "--compile", "default"]),
        ("hirm_cost", ["hirm-cost", *hirm]),
        # The published closed-form figures (issue 13): UCE 3.48 s, ErasePro 15.71 s.
        (
            "closed_form_cost",
            ["closed-form-cost", *closed_form, "--repeats", "1", "--methods", "uce,erasepro-text"],
        ),
    ]


def _figures(out: Path) -> dict[str, float | None]:
    def read(name: str) -> dict[str, Any]:
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    throughput, mixed, hirm = read("serve_throughput"), read("mixed_stacks"), read("hirm_cost")
    closed_form = read("closed_form_cost").get("methods", {})
    compiled = read("serve_throughput_compiled")
    plain = throughput.get("plain_diffusers_images_per_s")
    plain_compiled = compiled.get("plain_diffusers_images_per_s")
    # The server's best: eager or compiled, whichever served 16 tenants faster.
    served = [x.get("images_per_s_16_tenants") for x in (throughput, compiled)]
    sixteen = max((x for x in served if x), default=None)
    return {
        "plain_compiled_images_per_s": plain_compiled,
        "server_compiled_16_tenants_images_per_s": served[1],
        "server_over_plain_compiled": (
            round(sixteen / plain_compiled, 4) if plain_compiled and sixteen else None
        ),
        "plain_diffusers_images_per_s": plain,
        "server_1_tenant_images_per_s": throughput.get("images_per_s_1_tenant"),
        "server_16_tenants_images_per_s": sixteen,
        "server_over_plain": round(sixteen / plain, 4) if plain and sixteen else None,
        "ratio_16_over_1": throughput.get("ratio_16_over_1"),
        "ratio_b_over_a": mixed.get("ratio_b_over_a"),
        "ratio_c_over_a": mixed.get("ratio_c_over_a"),
        "hirm_seconds": hirm.get("seconds_median"),
        "uce_seconds": closed_form.get("uce", {}).get("seconds_median"),
        "erasepro_seconds": closed_form.get("erasepro-text", {}).get("seconds_median"),
        "hirm_compressed_mb": (
            round(hirm["compressed_patch_bytes"] / 1e6, 3)
            if "compressed_patch_bytes" in hirm
            else None
        ),
    }


def _checks(figures: dict[str, float | None]) -> list[dict[str, Any]]:
    checks = []
    for goal in GOALS:
        value = figures.get(goal.figure)
        met = None
        if value is not None:
            met = value >= goal.value if goal.op == ">=" else value <= goal.value
        target = f"{goal.op} {goal.value}"
        checks.append({"goal": goal.name, "figure": value, "target": target, "met": met})
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    plan = _plan(args, out)
    # The CPU smoke run traces the compiled path without generating code (minutes saved).
    env = {**os.environ, "CONCEPTGUARD_COMPILE_BACKEND": "eager"} if args.tiny else None
    for i, (name, command) in enumerate(plan, 1):
        shown = f"conceptguard bench {' '.join(command)}"
        print(f"[gpu-suite] {i}/{len(plan)} {name}: {shown}", flush=True)
        started = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "conceptguard.cli", "bench", *command,
                 "--json", str(out / f"{name}.json")],
                stdout=log, stderr=subprocess.STDOUT, check=False, env=env,
            )  # fmt: skip
        seconds = round(time.perf_counter() - started, 1)
        runs[name] = {"exit": proc.returncode, "seconds": seconds}
        print(f"[gpu-suite] {name}: exit {proc.returncode} after {seconds}s", flush=True)
    figures = _figures(out)
    result = {
        "tiny": args.tiny,
        "device": "cpu" if args.tiny else args.device,
        "runs": runs,
        "figures": figures,
        "checks": _checks(figures),
    }
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'goal':<70} {'figure':>10} {'target':>10}  met")
    for check in result["checks"]:
        value = "-" if check["figure"] is None else f"{check['figure']:.3f}"
        met = {True: "yes", False: "no", None: "-"}[check["met"]]
        print(f"{check['goal']:<70} {value:>10} {check['target']:>10}  {met}")
    if args.tiny:
        print("(--tiny: a smoke run on the CPU; these figures mean nothing)")
    print(f"written to {out / 'gpu_suite.json'}")
    return 0 if all(r["exit"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
