"""Load test: tenants generating concurrently while patches are re-registered every second.

    python -m bench.serve_load [--model PATH] [--seconds 60] [--clients 8] [--workers 2]

A real server (loopback only) serves 4 tenants, each starting with its own text-encoder
patch. Client threads generate for `--seconds`; meanwhile a new patch is pushed and assigned
to the next tenant (round robin) every `--interval` seconds through the admin API,
alternately a text-encoder patch and a U-Net LoRA patch (served per row), so tenants'
stacks keep changing on both sides of the model. Checks:

- failed requests: every request must succeed;
- wrong stacks: each response's patch ids must be its tenant's stack at the registry
  generation the response records (read back from the tenant's history);
- stale stacks: a request sent after an assignment returned must be served with that stack
  or a later one;
- reload latency: per assignment and worker, the time from the assignment returning to the
  first response from that worker with the new stack (p50 / p99 / max; goal p99 <= 1 s).
  It includes waiting for that tenant's next request to reach that worker and the whole
  generation, so the table also gives "pick-up" (to the start of the first batch serving the
  tenant with the new stack) and "next batch" (to the start of each worker's next batch, any
  tenant), and checks that no batch started after an assignment used the old stack;
  "new-stack wait" is how long each worker's first request with the new stack waited for
  its batch to start (a whole batch more when its rows were held back for the build).

With `--mode hostile` a fifth tenant attacks meanwhile (bench/serve_hostile.py): it sends
malformed and oversized requests (`--hostile-rate` per second), holds connections that stop
in their headers or body, and the admin gives it a new stack of `--stack-size` patches every
`--stack-interval` seconds. `--mode both` alternates quiet and hostile windows of
`--window` seconds on one server (so both phases see the same machine, whatever else runs on
it) and compares them: none of the four tenants' requests may fail, and their p99 latency
while under attack must stay within 1.5x of the quiet windows'.

Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TENANTS = ["t0", "t1", "t2", "t3"]
PROMPTS = ["a red circle", "a blue square on grass", "two green triangles", "a yellow star"]


@dataclass
class Sample:
    tenant: str
    sent: float
    received: float
    status: int
    patches: list[str] = field(default_factory=list)
    generation: int = -1
    tenant_generation: int = -1
    worker: int = -1
    batch_started_at: float = 0.0  # unix time
    detail: str = ""


@dataclass
class Registration:
    tenant: str
    patch_id: str
    generation: int
    done: float  # monotonic, when the assignment returned
    done_unix: float


def _client(server, index: int, body: dict, stop: float, out: list[Sample], lock) -> None:
    k = 0
    while time.monotonic() < stop:
        tenant = TENANTS[(index + k) % len(TENANTS)]
        request = {**body, "prompt": PROMPTS[k % len(PROMPTS)], "seed": index * 1000 + k}
        sent = time.monotonic()
        try:
            response = server.generate(tenant, request, timeout=120)
            status, answer = response.status_code, response.json()
        except Exception as exc:  # a failed request is a result here, not a crash
            status, answer = 0, {"detail": repr(exc)}
        sample = Sample(tenant, sent, time.monotonic(), status)
        if status == 200:
            record = answer["conceptguard"]
            sample.patches = record["patches"]
            sample.generation = record["generation"]
            sample.tenant_generation = record["tenant_generation"]
            sample.worker = record["worker"]
            sample.batch_started_at = record["batch_started_at"]
        else:
            sample.detail = str(answer.get("detail"))[:300]
        with lock:
            out.append(sample)
        k += 1


def _registrar(server, patches, interval: float, stop: float, out: list[Registration]) -> None:
    started = time.monotonic()
    k = 0
    while True:
        due = started + (k + 1) * interval
        if due >= stop:
            return
        time.sleep(max(0.0, due - time.monotonic()))  # pacing the registrations, not syncing
        tenant = TENANTS[k % len(TENANTS)]
        patch = patches[k % len(patches)]
        server.push(patch.to_bytes(), f"load-{k}")
        record = server.assign(tenant, [patch.id])
        out.append(
            Registration(tenant, patch.id, record["generation"], time.monotonic(), time.time())
        )
        k += 1


def _stack_at(history: list[dict], generation: int) -> dict | None:
    earlier = [entry for entry in history if entry["generation"] <= generation]
    return max(earlier, key=lambda e: e["generation"]) if earlier else None


def analyse(samples: list[Sample], registrations: list[Registration], histories: dict) -> dict:
    ok = [s for s in samples if s.status == 200]
    wrong, stale = [], []
    for s in ok:
        entry = _stack_at(histories[s.tenant], s.generation)
        if (
            entry is None
            or entry["stack"] != s.patches
            or entry["generation"] != s.tenant_generation
        ):
            wrong.append(asdict(s))
        done_before = [r for r in registrations if r.tenant == s.tenant and r.done < s.sent]
        if done_before and s.tenant_generation < max(r.generation for r in done_before):
            stale.append(asdict(s))
    workers = sorted({s.worker for s in ok})
    latencies, pickups, all_workers, next_batch, old_after = [], [], [], [], []
    # Samples are timed on this process's monotonic clock, batch starts on the wall clock.
    offset = float(np.median([r.done_unix - r.done for r in registrations])) if registrations else 0
    first_waits = []
    for reg in registrations:
        per_worker = []
        for worker in workers:
            served = [
                s
                for s in ok
                if s.tenant == reg.tenant
                and s.worker == worker
                and s.tenant_generation >= reg.generation
            ]
            if served:
                first = min(served, key=lambda s: s.received)
                per_worker.append(first.received - reg.done)
                # Pick-up: the worker's first batch with the new stack started this long after.
                pickups.append(min(s.batch_started_at for s in served) - reg.done_unix)
                # That request's own wait for a batch: one more batch if it was held back
                # while its stack was built.
                first_waits.append(first.batch_started_at - (first.sent + offset))
        latencies += per_worker
        if len(per_worker) == len(workers):
            all_workers.append(max(per_worker))
        for worker in workers:
            later = [s.batch_started_at for s in ok if s.worker == worker]
            later = [t for t in later if t > reg.done_unix]
            if later:
                next_batch.append(min(later) - reg.done_unix)
        # Every batch that started after the assignment returned must use the new stack.
        old_after.extend(
            asdict(s)
            for s in ok
            if s.tenant == reg.tenant
            and s.batch_started_at > reg.done_unix
            and s.tenant_generation < reg.generation
        )
    duration = max(s.received for s in samples) - min(s.sent for s in samples)

    def pct(values, q):
        return round(float(np.percentile(values, q)), 4) if values else None

    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "wrong_stack": len(wrong),
        "stale_stack": len(stale),
        "registrations": len(registrations),
        "worker_ids": workers,
        "requests_per_s": round(len(ok) / duration, 2),
        "latency_p50_s": pct([s.received - s.sent for s in ok], 50),
        "latency_p99_s": pct([s.received - s.sent for s in ok], 99),
        "reload_p50_s": pct(latencies, 50),
        "reload_p99_s": pct(latencies, 99),
        "reload_max_s": round(max(latencies), 4) if latencies else None,
        "reload_all_workers_p99_s": pct(all_workers, 99),
        "reload_pairs_measured": len(latencies),
        "old_stack_in_later_batch": len(old_after),
        "next_batch_p50_s": pct(next_batch, 50),
        "next_batch_p99_s": pct(next_batch, 99),
        "pickup_p50_s": pct(pickups, 50),
        "pickup_p99_s": pct(pickups, 99),
        "new_stack_wait_p50_s": pct(first_waits, 50),
        "new_stack_wait_p99_s": pct(first_waits, 99),
        "examples_failed": [asdict(s) for s in samples if s.status != 200][:5],
        "examples_wrong": wrong[:5],
        "examples_stale": stale[:5],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serve_harness import STAGES, stage_sums, start_bench_server, tenant_key
    from bench.serve_hostile import (
        HOSTILE_TENANT,
        HostileTenant,
        StackChurner,
        compare,
        phase_figures,
        windows_for,
    )
    from bench.synthetic_patches import lora_noise_patch, noise_patch
    from patches.loading import load_pipeline
    from server.default_model import default_model_path
    from server.generation import native_size

    model = args.model or str(default_model_path())
    hostile = args.mode != "quiet"
    pipe = load_pipeline(model)
    native = native_size(pipe)
    patches = [
        noise_patch(pipe, seed=100 + i) if i % 2 else lora_noise_patch(pipe, 100 + i, 1 + i % 4)
        for i in range(int(args.seconds / args.interval) + 8)
    ]
    initial = [noise_patch(pipe, seed=10 + i) for i in range(len(TENANTS))]
    # The hostile tenant's stacks: rotations of a pool of both kinds, each one new.
    pool = [
        noise_patch(pipe, seed=500 + i) if i % 2 else lora_noise_patch(pipe, 500 + i, 4)
        for i in range(2 * args.stack_size if hostile else 0)
    ]
    del pipe
    windows = windows_for(args.seconds, args.window, args.mode)
    with tempfile.TemporaryDirectory(prefix="cg-serve-load-") as folder:
        batching = {"max_batch_size": args.batch, "batch_timeout_s": 0.02}
        # The hostile tenant is configured whatever the mode: the same server in each.
        tenants = [*TENANTS, HOSTILE_TENANT]
        server = start_bench_server(Path(folder), model, tenants, args.workers, batching)
        try:
            for tenant, patch in zip(TENANTS, initial, strict=True):
                server.push(patch.to_bytes(), f"initial-{tenant}")
                server.assign(tenant, [patch.id])
            pool_ids = [server.push(p.to_bytes(), f"hostile-{i}")["id"] for i, p in enumerate(pool)]
            attacker = HostileTenant(
                server.url, server.port, tenant_key(HOSTILE_TENANT), native, args.hostile_rate
            )
            churner = StackChurner(server.assign, pool_ids, args.stack_size, args.stack_interval)
            body = {"steps": args.steps, "n": 1}
            samples: list[Sample] = []
            registrations: list[Registration] = []
            lock = threading.Lock()
            t0 = time.monotonic()
            stop = t0 + args.seconds
            threads = [
                threading.Thread(target=_client, args=(server, i, body, stop, samples, lock))
                for i in range(args.clients)
            ]
            threads.append(
                threading.Thread(
                    target=_registrar, args=(server, patches, args.interval, stop, registrations)
                )
            )
            for thread in threads:
                thread.start()
            for _, end, phase in windows:
                if phase == "hostile":
                    attack = [*attacker.run(t0 + end), churner.run(t0 + end)]
                    for thread in attack:
                        thread.join(timeout=args.seconds + 60)
                else:
                    time.sleep(max(0.0, t0 + end - time.monotonic()))  # a quiet window
            for thread in threads:
                thread.join(timeout=args.seconds + 300)
            histories = {t: server.admin("GET", f"/v1/tenants/{t}")["history"] for t in TENANTS}
            sums = stage_sums(server)
        finally:
            server.stop()
    result = analyse(samples, registrations, histories)
    result.update(
        model=model,
        mode=args.mode,
        seconds=args.seconds,
        clients=args.clients,
        workers=args.workers,
        steps=args.steps,
        max_batch_size=args.batch,
        interval_s=args.interval,
    )
    # What a reload's parts cost: a stack build, and a batch (the pick-up waits for batches).
    builds, batches = sums.get("stack_builds", 0.0), sums.get("batches", 0.0)
    stage_s = sum(sums.get(stage, 0.0) for stage in STAGES)
    result["stack_builds"] = int(builds)
    result["stack_build_mean_s"] = round(sums["stack_build_s"] / builds, 4) if builds else None
    result["batch_mean_s"] = round(stage_s / batches, 4) if batches else None
    phases = sorted({phase for _, _, phase in windows})
    result["phases"] = {phase: phase_figures(samples, windows, t0, phase) for phase in phases}
    if hostile:
        counts: dict[str, dict[str, int]] = {}
        for (label, status), count in sorted(attacker.results.items()):
            counts.setdefault(label, {})[str(status)] = count
        result["hostile"] = {
            "windows_s": [[round(a, 1), round(b, 1)] for a, b, p in windows if p == "hostile"],
            "requests": sum(attacker.results.values()),
            "rate_per_s": args.hostile_rate,
            "answers": counts,
            "unexpected": attacker.unexpected[:20],
            "unexpected_count": len(attacker.unexpected),
            "stalled_connections_held": attacker.stalled,
            "stalled_connections_closed_by_server": attacker.reopened,
            "stacks_assigned": churner.assigned,
            "stack_size": churner.size,
            "stack_interval_s": args.stack_interval,
        }
    if args.mode == "both":
        result["comparison"] = compare(result["phases"]["quiet"], result["phases"]["hostile"])
        result["comparison"]["hostile_unexpected"] = len(attacker.unexpected)
    return result


def _table(result: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [
        ("requests (failed)", f"{result['requests']} ({result['failed']})"),
        ("wrong / stale stacks", f"{result['wrong_stack']} / {result['stale_stack']}"),
        ("registrations", result["registrations"]),
        ("throughput", f"{result['requests_per_s']} req/s"),
        ("latency p50 / p99", f"{result['latency_p50_s']} / {result['latency_p99_s']} s"),
        (
            "reload p50 / p99 / max",
            f"{result['reload_p50_s']} / {result['reload_p99_s']} / "
            f"{result['reload_max_s']} s (per worker)",
        ),
        ("reload on all workers p99", f"{result['reload_all_workers_p99_s']} s"),
        ("pick-up p50 / p99", f"{result['pickup_p50_s']} / {result['pickup_p99_s']} s"),
        ("next batch p50 / p99", f"{result['next_batch_p50_s']} / {result['next_batch_p99_s']} s"),
        (
            "new-stack request's wait p50 / p99",
            f"{result['new_stack_wait_p50_s']} / {result['new_stack_wait_p99_s']} s",
        ),
        ("old stack after pick-up", result["old_stack_in_later_batch"]),
        ("stack builds (mean)", f"{result['stack_builds']} ({result['stack_build_mean_s']} s)"),
        ("batch, mean of its stages", f"{result['batch_mean_s']} s"),
    ]
    for phase, figures in result["phases"].items():
        rows.append(
            (
                f"{phase}: requests (failed)",
                f"{figures['requests']} ({figures['failed']}) in {figures['seconds']} s",
            )
        )
        latency = f"{figures['latency_p50_s']} / {figures['latency_p99_s']} s"
        rows.append((f"{phase}: latency p50 / p99", latency))
    if "hostile" in result:
        hostile = result["hostile"]
        refused = hostile["unexpected"] or "all refused 4xx"
        rows.append(("hostile requests", f"{hostile['requests']} ({refused})"))
        rows.append(("hostile stacks assigned", hostile["stacks_assigned"]))
        rows.append(
            ("hostile slow connections cut", hostile["stalled_connections_closed_by_server"])
        )
    if "comparison" in result:
        rows.append(("others p99 hostile / quiet", result["comparison"]["p99_ratio"]))
    return rows


def _passed(result: dict[str, Any]) -> bool:
    ok = not (result["failed"] or result["wrong_stack"] or result["stale_stack"])
    ok = ok and not result["old_stack_in_later_batch"]
    if "comparison" in result:
        comparison = result["comparison"]
        ok = ok and comparison["p99_within_1.5x"] and not comparison["hostile_unexpected"]
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers folder (default: the embedded model)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="max batch size")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between patches")
    parser.add_argument("--mode", choices=("quiet", "hostile", "both"), default="quiet")
    parser.add_argument("--window", type=float, default=15.0, help="--mode both: window s")
    parser.add_argument("--hostile-rate", type=float, default=20.0, help="bad requests per s")
    parser.add_argument("--stack-size", type=int, default=16, help="hostile stacks' patches")
    parser.add_argument("--stack-interval", type=float, default=2.0, help="s between them")
    parser.add_argument(
        "--json",
        "--out",
        dest="json_out",
        help="write the result here (default docs/results/serve_load[_MODE].json; --out: its "
        "former name)",
    )
    args = parser.parse_args(argv)
    suffix = {"quiet": "", "hostile": "_hostile_only", "both": "_hostile"}[args.mode]
    out = Path(args.json_out or f"docs/results/serve_load{suffix}.json")
    result = run(args)
    for name, value in _table(result):
        print(f"{name:<32} {value}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0 if _passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
