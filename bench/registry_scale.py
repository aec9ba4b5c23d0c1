"""`conceptguard bench registry-scale`: what one assignment costs a serving worker when the
registry holds many tenants (issue 20), on the local directory or a PostgreSQL database.

A new, empty registry at --registry gets two text-encoder patches for the model and
--tenants tenants holding the first (one bulk copy, as `registry migrate` writes it). A
worker's patch runtime (server/runtime.py) on the model catches up once (cold start), then
each round assigns one tenant the other stack and times the worker's `refresh()` that
follows: the change feed plus the tenant states it touches. Both stacks are built during the
warm-up, so the figure is the refresh, not a stack build.

    conceptguard bench registry-scale --registry /tmp/reg --tenants 10000 --json local.json
    conceptguard bench registry-scale --registry postgresql://USER@HOST/DB --tenants 10000

With `--replicas N` it then starts N real servers on the registry and times registration ->
first answer with the new stack on each (bench/registration_served.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="conceptguard bench registry-scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--registry", required=True, help="a new registry: directory or URL")
    parser.add_argument("--model", help="diffusers folder (default: the embedded model)")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="also time registration -> served on this many real servers sharing the "
        "registry (bench/registration_served.py; 0: skip)",
    )
    parser.add_argument("--served-rounds", type=int, default=20)
    parser.add_argument("--probe-steps", type=int, default=1, help="steps of each probe request")
    parser.add_argument("--json", dest="json_out", help="write the result here")
    return parser.parse_args(argv)


def _bulk_state(patch_ids: list[str], records: dict, tenants: int):
    """The registry state: the patches and `tenants` tenants holding the first one."""
    from patches.registry_records import StackEntry, TenantRecord
    from patches.registry_state import RegistryState

    at = datetime.now(timezone.utc).isoformat()
    stack = (patch_ids[0],)
    first = len(patch_ids) + 1  # each registration and each assignment was one write
    tenant_records = {}
    for i in range(tenants):
        name, generation = f"t{i:05d}", first + i
        entry = StackEntry(generation, stack, at, "assign")
        tenant_records[name] = TenantRecord(name, stack, generation, (entry,))
    versions = {records[pid].name: records[pid].version for pid in patch_ids}
    generation = len(patch_ids) + tenants
    return RegistryState(generation, dict(records), tenant_records, versions)


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.synthetic_patches import noise_patch
    from patches.loading import load_pipeline
    from patches.registry import open_registry, shown_location
    from server.default_model import default_model_path
    from server.runtime import PatchRuntime

    torch.set_num_threads(1)
    source = args.model or str(default_model_path())
    pipe = load_pipeline(source, "float32", "cpu")
    # Patches are stored in a scratch registry first, for their records and bytes.
    scratch_dir = Path(f"/tmp/cg-registry-scale-{time.time_ns()}")
    scratch = open_registry(scratch_dir, create=True)
    ids = [scratch.put_patch(noise_patch(pipe, seed=s).to_bytes(), f"scale{s}").id for s in (1, 2)]
    records = {pid: scratch.patch_record(pid) for pid in ids}
    registry = open_registry(args.registry, create=True)
    started = time.perf_counter()
    registry.import_copy(_bulk_state(ids, records, args.tenants), scratch.get_patch_bytes)
    import_s = time.perf_counter() - started
    print(f"registry {shown_location(args.registry)}: {args.tenants} tenants in {import_s:.1f}s")

    runtime = PatchRuntime(registry, pipe)
    started = time.perf_counter()
    runtime.refresh(wait=True)
    cold_s = time.perf_counter() - started
    # Warm-up: the second stack is built once, so the rounds time refreshes, not builds.
    registry.set_tenant("t00000", [ids[1]], create=False)
    runtime.refresh(wait=True)
    write_ms, refresh_ms = [], []
    for round_ in range(args.rounds):
        tenant = f"t{(round_ * 7919) % args.tenants:05d}"
        target = ids[1] if ids[0] in runtime.snapshot.state_for(tenant).stack else ids[0]
        started = time.perf_counter()
        registry.set_tenant(tenant, [target], create=False)
        write_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        snapshot = runtime.refresh()
        refresh_ms.append(1000 * (time.perf_counter() - started))
        if not snapshot.state_for(tenant).ready:
            snapshot = runtime.refresh(wait=True)
        assert snapshot.state_for(tenant).stack == (target,), "the refresh missed the change"
        if (round_ + 1) % 10 == 0:
            print(f"round {round_ + 1}/{args.rounds}: refresh {refresh_ms[-1]:.2f} ms")
    served = None
    if args.replicas:
        from bench.registration_served import measure

        served = measure(
            registry,
            str(args.registry),
            source,
            pipe,
            args.replicas,
            args.served_rounds,
            args.probe_steps,
        )
    registry.close()
    scratch.close()
    shutil.rmtree(scratch_dir, ignore_errors=True)
    return {
        "registry": shown_location(args.registry),
        "backend": "postgresql" if "://" in str(args.registry) else "local",
        "tenants": args.tenants,
        "rounds": args.rounds,
        "import_s": round(import_s, 3),
        "cold_refresh_s": round(cold_s, 3),
        "refresh_ms": {
            "p50": round(statistics.median(refresh_ms), 3),
            "p99": round(percentile(refresh_ms, 0.99), 3),
            "max": round(max(refresh_ms), 3),
        },
        "assign_ms": {
            "p50": round(statistics.median(write_ms), 3),
            "p99": round(percentile(write_ms, 0.99), 3),
        },
        "served": served,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    r, w = result["refresh_ms"], result["assign_ms"]
    print(
        f"{result['backend']}, {result['tenants']} tenants: a worker's refresh after one "
        f"assignment p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, max {r['max']:.2f} ms; "
        f"the assignment itself p50 {w['p50']:.1f} ms; cold start {result['cold_refresh_s']}s"
    )
    if result["served"]:
        served = result["served"]
        t = served["registration_to_served_ms"]
        print(
            f"registration -> first answer with the new stack on each of {served['replicas']} "
            f"replicas: p50 {t['p50']:.0f} ms, p99 {t['p99']:.0f} ms, max {t['max']:.0f} ms "
            f"(the same probes, stack unchanged: {served['unchanged_request_ms_p50']:.0f} ms; "
            f"{served['stale_answers']} stale answers)"
        )
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
