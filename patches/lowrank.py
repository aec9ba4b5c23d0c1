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

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight the factors edit (known without multiplying them)."""
        return (self.b.shape[0], *self.a.shape[1:])

    def dense(self) -> torch.Tensor:
        """The delta as a weight-shaped tensor (for checks and offline application)."""
        flat = self.b.reshape(self.b.shape[0], -1).float() @ self.a.reshape(self.rank, -1).float()
        return flat.reshape(self.shape)


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T of a Linear / Conv2d delta, the kernel flattened into the input dimension."""
    return torch.linalg.svd(
        delta.detach().reshape(delta.shape[0], -1).double(), full_matrices=False
    )


def _factors(delta: torch.Tensor, u, s, vh, keep: int) -> LowRank:
    """delta's leading `keep` singular directions as (U S^1/2)(S^1/2 V^T)."""
    root = s[:keep].sqrt()
    b = (u[:, :keep] * root).float()
    a = (root[:, None] * vh[:keep]).float().reshape(keep, *delta.shape[1:])
    return LowRank(a.contiguous(), b.contiguous())


def factor_exactly(delta: torch.Tensor, max_rank: int | None = None, label: str = "") -> LowRank:
    """Exact low-rank factors of a Linear ([out, in]) or Conv2d ([out, in, kh, kw]) delta."""
    u, s, vh = _svd(delta)
    keep = int((s > RELATIVE_RANK_TOLERANCE * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if max_rank is not None and keep > max_rank:
        raise WrongTarget(
            f"the edit of {label or 'a layer'} has rank {keep}; per-row serving takes at most "
            f"{max_rank} (make the edit low-rank, e.g. fewer edited token vectors)"
        )
    return _factors(delta, u, s, vh, keep)


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


# --- low-rank weight edits: a `lowrank` patch's tensors ------------------------------------

# A `lowrank` text_encoder / unet_weights patch stores each edited matrix's delta as factors
# `<parameter>.lowrank_A` [rank, in (, kh, kw)] and `<parameter>.lowrank_B` [out, rank];
# parameters without the suffixes (biases, norms) are dense deltas.
LOWRANK_A, LOWRANK_B = ".lowrank_A", ".lowrank_B"
# The largest parameter a factor pair may stand for: checked before anything is multiplied,
# so an untrusted file of small factors cannot make us allocate a huge product.
MAX_EDIT_ELEMENTS = 2**27


def split_lowrank(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, LowRank], dict[str, torch.Tensor]]:
    """(parameter -> factors, parameter -> dense delta) of a lowrank patch's tensors; refuses
    unpaired or ill-shaped factors and products above MAX_EDIT_ELEMENTS."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        for suffix in (LOWRANK_A, LOWRANK_B):
            if name.endswith(suffix):
                halves.setdefault(name.removesuffix(suffix), {})[suffix] = tensor
                break
        else:
            dense[name] = tensor
    factors = {}
    for name, pair in halves.items():
        if len(pair) != 2:
            missing = LOWRANK_B if LOWRANK_A in pair else LOWRANK_A
            raise BadTensorEntry(f"'{name}' has no {missing.lstrip('.')}; factors come in pairs")
        if name in dense:
            raise BadTensorEntry(f"'{name}' is stored both densely and as low-rank factors")
        a, b = pair[LOWRANK_A], pair[LOWRANK_B]
        if a.dim() not in (2, 4) or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise BadTensorEntry(
                f"'{name}': lowrank_A {list(a.shape)} and lowrank_B {list(b.shape)} are not "
                "factors of one edit (expected A [rank, in] or [rank, in, kh, kw], B [out, rank])"
            )
        if b.shape[0] * a[0].numel() > MAX_EDIT_ELEMENTS:
            raise BadTensorEntry(f"'{name}': the factors stand for more than 2^27 values")
        factors[name] = LowRank(a, b)
    return factors, dense


def truncate(delta: torch.Tensor, rank: int) -> tuple[LowRank, float]:
    """The best rank-`rank` factors of a Linear / Conv2d delta (a truncated SVD) and their
    relative error ||delta - B A||_F / ||delta||_F."""
    u, s, vh = _svd(delta)
    keep = max(1, min(rank, s.numel()))
    total = float(s.square().sum())
    error = float(s[keep:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    return _factors(delta, u, s, vh, keep), error
