"""Low-rank factors of weight edits: what the per-row denoiser serves.

A LoRA pair already is one: delta W = B A (A: [rank, in] or [rank, in, kh, kw] for a
convolution, whose kernel A carries; B: [out, rank]). A dense edit of a Linear or Conv2d
weight (a `unet_weights` patch: UCE's and ErasePro's closed-form cross-attention edits) is
factored exactly with an SVD of the delta, the convolution's kernel flattened into its
input dimension: delta W = U S V^T = (U S^1/2)(S^1/2 V^T), keeping the singular values above
a relative tolerance. A closed-form edit that aligns k token vectors has rank <= k, however
large the layer is; a full-rank delta costs min(out, in) and is refused above a limit.

Several edits of one layer act as one adapter whose rank is the sum: their factors are
concatenated, [B1 B2] [A1; A2] = B1 A1 + B2 A2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patches.errors import BadTensorEntry, WrongTarget

# Singular values below this fraction of the largest are rounding noise of a float32 delta.
RELATIVE_RANK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class LowRank:
    """delta W = b @ a (a convolution's `a` keeps its kernel: [rank, in, kh, kw])."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def dense(self) -> torch.Tensor:
        """The delta as a weight-shaped tensor (for checks and offline application)."""
        flat = self.b.reshape(self.b.shape[0], -1).float() @ self.a.reshape(self.rank, -1).float()
        return flat.reshape(self.b.shape[0], *self.a.shape[1:])


def factor_exactly(delta: torch.Tensor, max_rank: int | None = None, label: str = "") -> LowRank:
    """Exact low-rank factors of a Linear ([out, in]) or Conv2d ([out, in, kh, kw]) delta."""
    out = delta.shape[0]
    flat = delta.detach().reshape(out, -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    keep = int((s > RELATIVE_RANK_TOLERANCE * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if max_rank is not None and keep > max_rank:
        raise WrongTarget(
            f"the edit of {label or 'a layer'} has rank {keep}; per-row serving takes at most "
            f"{max_rank} (make the edit low-rank, e.g. fewer edited token vectors)"
        )
    root = s[:keep].sqrt()
    b = (u[:, :keep] * root).float()
    a = (root[:, None] * vh[:keep]).float().reshape(keep, *delta.shape[1:])
    return LowRank(a.contiguous(), b.contiguous())


def concatenate(parts: Sequence[LowRank]) -> LowRank:
    """One adapter equal to the sum of `parts` (rank = the sum of their ranks)."""
    if len(parts) == 1:
        return parts[0]
    return LowRank(torch.cat([p.a for p in parts], 0), torch.cat([p.b for p in parts], 1))


def lora_as_lowrank(lora_a: torch.Tensor, lora_b: torch.Tensor) -> LowRank:
    """A LoRA pair (peft layout: B is [out, rank], or a 1x1 convolution) as factors."""
    if lora_b.dim() == 4 and tuple(lora_b.shape[2:]) != (1, 1):
        raise BadTensorEntry(
            f"a convolution LoRA's lora_B must be 1x1 (as peft makes it), not "
            f"{list(lora_b.shape[2:])}"
        )
    return LowRank(lora_a, lora_b.reshape(lora_b.shape[0], lora_b.shape[1]))
