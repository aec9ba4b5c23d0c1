"""Compiled serving (`conceptguard serve --compile MODE`): the denoiser and the VAE decoder
through torch.compile, traced once per batch bucket and never again for a tenant or patch
change (server/denoiser_routing.py says how the routing stays static).

Off by default: compiling pays minutes at start-up (every worker warms each bucket up
before it reports ready) and only a GPU gains from it; `bench serve-throughput --compile`
measures whether it does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from server.config import COMPILE_MODES
from server.denoiser_routing import DenoiserRouter, bucket
from server.row_routing import pad_rows, unpad_rows

# The torch.compile backend: inductor, or "eager" to run dynamo's tracing without code
# generation (what the CPU smoke runs use: the plumbing, not the speed).
BACKEND = os.environ.get("CONCEPTGUARD_COMPILE_BACKEND", "inductor")


def compiled_graphs() -> int:
    """Graphs dynamo has traced in this process (a worker compiles nothing else): one per
    batch bucket after warm-up, so a rise while serving is a recompilation."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _padded(function: Callable[..., Any], mode: str | None) -> Callable[..., Any]:
    """`function(latents, ...)` compiled, its batch padded to a power of two (one graph per
    bucket, like the denoiser's) and its output cut back."""
    compiled = torch.compile(function, mode=mode, backend=BACKEND)

    def call(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch = latents.shape[0]
        size = bucket(batch)
        return unpad_rows(compiled(pad_rows(latents, batch, size), *args, **kwargs), size, batch)

    return call


def compile_pipeline(pipe: Any, router: DenoiserRouter, mode: str) -> bool:
    """Compile `pipe`'s denoiser (through `router`) and VAE decoder for serving; False when
    `mode` is off."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return False
    torch_mode = None if mode == "default" else mode
    router.compile(mode=torch_mode, backend=BACKEND)
    pipe.vae.decode = _padded(pipe.vae.decode, torch_mode)
    return True


def warm_up_rows(max_rows: int) -> list[int]:
    """Image rows per warm-up batch so that every batch bucket a worker can see is compiled
    before it serves: 1, 2, 4, ... up to `max_rows` (the max batch size x the images a
    request may ask for)."""
    rows, n = [], 1
    while n < max_rows:
        rows.append(n)
        n *= 2
    return [*rows, max_rows]
