"""Smaller weight patches: a text_encoder / unet_weights patch as low-rank deltas in the
served precision (`conceptguard patch compress`).

HiRM rewrites all of a text-encoder block: its patch holds the block in float32 (27 MB for
CLIP-L's block 0). What a patch needs to carry is its change to the base, and a trained
change is dominated by a few directions: each edited matrix's delta becomes its best rank-r
factors (a truncated SVD), stored in float16 or bfloat16 like the weights a GPU serves. The
result is an ordinary `lowrank` patch for the same base (same fingerprints); it is lossy, so
the report gives each matrix's relative error and the patch should be measured again
(`bench quality`) before it replaces the original.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from patches.errors import WrongTarget
from patches.loading import DTYPES
from patches.lowrank import LOWRANK_A, LOWRANK_B, truncate
from patches.patch import Patch
from patches.stacks import WEIGHT_KINDS, base_parameters


@dataclass
class CompressionReport:
    source_id: str
    rank: int
    dtype: str
    source_bytes: int
    bytes: int
    # matrix name -> relative error ||delta - B A||_F / ||delta||_F (float32 factors)
    errors: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "max_error": self.max_error}


def compress_patch(
    patch: Patch, pipe: Any, rank: int, dtype: str = "float16"
) -> tuple[Patch, CompressionReport]:
    """`patch` (verified against `pipe`'s unpatched base) as rank-`rank` deltas in `dtype`.

    A matrix whose factors would not be smaller than the matrix (rank >= in*out/(in+out))
    is kept as an exact dense delta; vectors (biases, norms) are dense deltas."""
    kind, component = patch.manifest.kind, patch.manifest.target.component
    if kind not in WEIGHT_KINDS:
        raise WrongTarget(f"only {' and '.join(WEIGHT_KINDS)} patches compress; this is {kind}")
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, not {rank}")
    store = DTYPES[dtype]
    patch.verify(pipe)
    base = base_parameters(pipe, component)
    mode = patch.manifest.mode
    tensors: dict[str, torch.Tensor] = {}
    report = CompressionReport(patch.id, rank, dtype, len(patch.to_bytes()), 0)
    with torch.no_grad():
        for name, edit in sorted(patch.weight_edits().items()):
            delta = edit.float() - base[name].float() if mode == "override" else edit.float()
            if not delta.any():
                continue  # an override that kept this parameter: nothing to store
            if delta.dim() in (2, 4):
                out, fan_in = delta.shape[0], delta[0].numel()
                if rank * (out + fan_in) < out * fan_in:
                    factors, error = truncate(delta, rank)
                    tensors[name + LOWRANK_A] = factors.a.to(store)
                    tensors[name + LOWRANK_B] = factors.b.to(store)
                    report.errors[name], report.ranks[name] = error, factors.rank
                    continue
            tensors[name] = delta.to(store)
    params = {
        **patch.manifest.params,
        "compressed": {"from": patch.id, "rank": rank, "dtype": dtype},
    }
    compressed = Patch.create(
        pipe=pipe,
        kind=kind,
        component=component,
        method=patch.manifest.method,
        concepts=list(patch.manifest.concepts),
        tensors=tensors,
        mode="lowrank",
        params=params,
        name=patch.manifest.name,
    )
    report.bytes = len(compressed.to_bytes())
    return compressed, report
