"""Registration -> served across replicas (issue 20): `bench registry-scale --replicas N`.

N real servers (one worker each, so a replica's answer is its worker's) share one registry.
Each round registers a new patch, assigns it to the probe tenant, and from the moment the
assignment returns, one client per replica sends requests back to back until that replica
answers with the new stack. The figure per (round, replica) is that time: the change feed,
loading and building the new stack, and one generation of `--probe-steps` steps; beside it,
the same probes once the stack is served (every replica at once too), so the difference is
what the registration costs. A response after the assignment that carries the old stack is
counted as stale (never allowed).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.registry_scale import percentile

PROBE = "probe"


def _first_with(server: Any, stack: list[str], started: float, steps: int) -> tuple[float, int]:
    """Seconds from `started` to this replica's first answer with `stack`; stale answers."""
    body = {"prompt": "a red circle", "seed": 1, "steps": steps}
    for stale in range(200):  # bounded: a build that never finishes fails the benchmark
        response = server.generate(PROBE, body, timeout=120)
        if response.status_code != 200:
            raise RuntimeError(
                f"replica {server.url}: HTTP {response.status_code}: {response.text}"
            )
        if response.json()["conceptguard"]["patches"] == stack:
            return time.perf_counter() - started, stale
    raise RuntimeError(f"replica {server.url} never served the new stack")


def _round(servers: list[Any], stack: list[str], steps: int) -> list[tuple[float, int]]:
    """All replicas at once, from now (the assignment has just returned)."""
    started = time.perf_counter()
    results: list[tuple[float, int]] = []

    def probe(server: Any) -> None:
        results.append(_first_with(server, stack, started, steps))

    threads = [threading.Thread(target=probe, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(results) != len(servers):
        raise RuntimeError("a replica's client failed (see above)")
    return results


def measure(
    registry: Any, location: str, model: str, pipe: Any, replicas: int, rounds: int, steps: int
) -> dict[str, Any]:
    from bench.serve_harness import start_bench_server
    from bench.synthetic_patches import noise_patch

    registry.set_tenant(PROBE, [], create=True)
    folder = Path(tempfile.mkdtemp(prefix="cg-registration-served-"))
    servers = []
    try:
        for i in range(replicas):
            servers.append(
                start_bench_server(
                    folder / f"replica{i}", model, [PROBE], workers=1, registry=location
                )
            )
        print(f"{replicas} replicas up (one worker each)")
        seconds: list[float] = []
        stale = 0
        for round_ in range(rounds):
            patch = registry.put_patch(noise_patch(pipe, seed=1000 + round_).to_bytes())
            registry.set_tenant(PROBE, [patch.id], create=False)
            results = _round(servers, [patch.id], steps)
            seconds += [r[0] for r in results]
            stale += sum(r[1] for r in results)
            print(f"round {round_ + 1}/{rounds}: {max(r[0] for r in results) * 1000:.0f} ms")
        # The same probes with the stack unchanged (every replica at once, as above): what
        # the answer costs here without a registration.
        unchanged = [r[0] for _ in range(5) for r in _round(servers, [patch.id], steps)]
    finally:
        for server in servers:
            server.stop()
    return {
        "replicas": replicas,
        "rounds": rounds,
        "probe_steps": steps,
        "registration_to_served_ms": {
            "p50": round(1000 * statistics.median(seconds), 1),
            "p99": round(1000 * percentile(seconds, 0.99), 1),
            "max": round(1000 * max(seconds), 1),
        },
        "unchanged_request_ms_p50": round(1000 * statistics.median(unchanged), 1),
        "stale_answers": stale,
    }
