"""UCE's edit (METHODS.md): for every text key/value projection of the denoiser, one solve

    W* = (lam W0 + W0 A C^T + W0 P P^T) (lam I + C C^T + P P^T)^-1

with C the target prompts' aligned token vectors, A their anchor twins', P the retain
prompts' (all positions, plus the empty prompt's). One shot: every layer's inputs come from
the original model (erasure/cross_attention.py). The patch is a `unet_lora` of the exact
factors of each layer's delta.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from erasure.closed_form import uce
from erasure.cross_attention import kv_layers, lora_patch, solve_end_point, text_tokens
from erasure.measure import peak_memory, reset_peak_memory
from erasure.uce.config import UceConfig
from patches.patch import Patch


@dataclass
class UceResult:
    patch: Patch
    layers: list[dict[str, Any]]  # per layer: residuals, ||dW||, condition, rank
    pairs: int  # aligned token pairs
    # For the verdict: the change of the edited layers' outputs on the concept's prompts
    # and on each held-out check prompt (relative).
    checks: dict[str, Any]
    seconds: float
    cpu_seconds: float  # this process's CPU time: the cost on a machine shared with others
    peak_memory_bytes: int
    peak_memory_kind: str


def erase_uce(pipe: Any, config: UceConfig) -> UceResult:
    """UCE for `config.concepts` on `pipe`'s denoiser; returns one unet_lora patch."""
    config.check()
    reset_peak_memory(config.device)
    started, cpu_started = time.perf_counter(), time.process_time()
    layers = kv_layers(pipe)
    targets, anchors = config.prompt_pairs()
    pairs = config.token_pairs(*text_tokens(pipe))

    def solve(w0, x, target, gram):
        return uce(w0, x, target, gram, config.lam, config.preserve_scale)

    with torch.no_grad():
        edit = solve_end_point(
            pipe,
            layers,
            targets,
            anchors,
            pairs,
            config.retain(),
            solve,
            progressive=False,
            check=list(config.check_prompts),
        )
    report = edit.rows
    patch, ranks = lora_patch(
        pipe,
        edit.deltas,
        method="uce",
        concepts=[c.name for c in config.concepts],
        params={"lam": config.lam, "preserve_scale": config.preserve_scale, **config.record()},
        name=config.name,
        eval={"layers": report},
    )
    for row in report:
        row.update(ranks.get(row["layer"], {"rank": 0, "dropped": 0.0}))
    peak, kind = peak_memory(config.device)
    checks = {"concept_shift": edit.concept_shift, "check_drift": edit.check_drift}
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return UceResult(patch, report, len(pairs), checks, seconds, cpu, peak, kind)
