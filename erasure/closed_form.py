"""Closed-form weight edits shared by UCE and ErasePro: the solves, in float64.

Notation (columns are token vectors): W0 [out, in] a layer's original weight; X [in, n] the
inputs the edit must redirect (target-concept tokens); Y [in, n] their token-aligned anchor
twins; P [in, m] inputs to keep (retain tokens).

- ErasePro (zero residual): argmin ||W - W0||  s.t.  W X = W0 Y, exactly. With the Frobenius
  norm the solution is W0 + W0 (Y - X) X^+ (METHODS.md). With a preservation metric
  M = I + w P P^T / s (s normalises P's scale), "minimal change" is measured as
  ||(W - W0) M^1/2||_F: the change avoids the retain inputs while the constraint stays exact,
      dW = W0 (Y - X) (X^T M^-1 X)^-1 X^T M^-1.
  Either way dW has rank <= n and its row space is spanned by X (or M^-1 X).
- UCE: argmin sum ||W c_e - W0 a_e||^2 + s sum ||W c_p - W0 c_p||^2 + lam ||W - W0||^2, i.e.
      W* = (lam W0 + W0 A C^T + s W0 P P^T) (lam I + C C^T + s P P^T)^-1,
      dW = W0 (A - C) C^T (lam I + C C^T + s P P^T)^-1     (rank <= n as well).
  The published sums weigh every token vector alike, so a retain set 25x the concept's
  set outweighs the erasure 25:1; here s = preserve_scale * n / m (n concept vectors, m
  retain vectors), so preserve_scale is the retain set's weight relative to the concept's
  whatever their sizes. Its residual W* C - W0 A is not zero for any lam > 0 or any
  preservation set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Singular values of X below this fraction of the largest are treated as zero: the exact
# constraint is imposed on the numerically independent part of X only (and reported).
RCOND = 1e-7


class Gram:
    """P P^T of the inputs to keep, accumulated in float64 batch by batch (a retain set's
    token vectors need not all be held at once), and their mean squared norm."""

    def __init__(self, dim: int):
        self.dim = dim
        self.sum: torch.Tensor | None = None  # on the device of the first batch
        self.count = 0
        self.total = 0.0

    def add(self, vectors: torch.Tensor) -> None:
        """Add rows [..., dim] (e.g. a batch of prompts' token vectors)."""
        flat = vectors.reshape(-1, self.dim)
        # Summed in float32 per batch (a metric needs no more), accumulated in float64.
        product = (flat.float().T @ flat.float()).double()
        self.sum = product if self.sum is None else self.sum + product.to(self.sum.device)
        self.count += flat.shape[0]
        self.total += float(product.trace())

    @property
    def matrix(self) -> torch.Tensor:
        """P P^T on the CPU, in float64 (zeros before any batch)."""
        if self.sum is None:
            return torch.zeros(self.dim, self.dim, dtype=torch.float64)
        return self.sum.cpu()

    @property
    def mean_square(self) -> float:
        return self.total / max(self.count, 1)


@dataclass(frozen=True)
class Solve:
    """One layer's edit and the figures the reports show."""

    delta: torch.Tensor  # [out, in], float32
    residual_before: float  # ||W0 X - T|| / ||T||, T the target outputs (W0 Y)
    residual_after: float  # ||W* X - T|| / ||T|| over every aligned token
    # The same on the constraints the solve imposed exactly (ErasePro: X's principal
    # combinations; equal to residual_after when X was used whole, and for UCE).
    residual_constrained: float
    condition: float  # condition number of the system that was solved
    constraints: int  # columns imposed: X's own, or its principal combinations

    @property
    def norm(self) -> float:
        return float(self.delta.norm())


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(value.norm() / reference.norm().clamp_min(1e-30))


def _residuals(w0, delta, x, target) -> tuple[float, float]:
    before = _relative(w0 @ x - target, target)
    after = _relative((w0 + delta) @ x - target, target)
    return before, after


def _metric_inverse(preserve: Gram | None, weight: float, dim: int) -> torch.Tensor | None:
    """M^-1 for M = I + weight * P P^T / (count * mean square): P P^T averaged and in units
    of the inputs' own scale, so one weight means the same for any width, scale and number
    of retain prompts."""
    if preserve is None or preserve.count == 0 or weight == 0:
        return None
    scaled = preserve.matrix / (preserve.count * max(preserve.mean_square, 1e-30))
    return torch.linalg.inv(torch.eye(dim, dtype=torch.float64) + weight * dim * scaled)


def _left_singular(x: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor]:
    """X's left singular vectors and values, largest first. With many more columns than
    rows (thousands of aligned tokens, a few hundred input features) from the eigenvectors
    of X X^T, which is much cheaper and in float64 exact enough for the directions kept
    when rcond >= 1e-6 (their eigenvalues are >= 1e-12 of the largest)."""
    if x.shape[1] <= 2 * x.shape[0] or rcond < 1e-6:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        return u, s
    evals, evecs = torch.linalg.eigh(x @ x.T)
    order = evals.flip(0).clamp_min(0)
    return evecs.flip(1), order.sqrt()


def as_record(solve: Solve) -> dict[str, float | int]:
    """The figures of a solve, for reports."""
    return {
        "constraints": solve.constraints,
        "condition": solve.condition,
        "residual_before": solve.residual_before,
        "residual_after": solve.residual_after,
        "residual_constrained": solve.residual_constrained,
        "delta_norm": solve.norm,
    }


def zero_residual(
    w0: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    preserve: Gram | None = None,
    preserve_weight: float = 0.0,
    rcond: float = RCOND,
) -> Solve:
    """ErasePro's edit of one layer: W X = target exactly (target = W0 Y in the spec's form),
    with the least change in the preservation metric (module doc).

    When X has more columns than independent directions (more aligned tokens than the
    layer's input width), no W meets every column; the constraint is then imposed exactly on
    X's principal combinations (X V_k, target V_k: the same mixtures of aligned pairs on
    both sides): those whose singular value is above `rcond` x the largest. With every
    independent direction kept that is the least-squares solution on the whole set; with
    fewer, its principal part, which changes the layer far less (small singular directions
    are amplified by 1/s). The residual on all columns says what is left."""
    w0d, xd, td = w0.double(), x.double(), target.double()
    u, s = _left_singular(xd, rcond)
    keep = int((s > rcond * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if keep == 0:
        raise ValueError("the target inputs are all zero: nothing to redirect")
    if keep < xd.shape[1]:
        # X V_k = U_k S_k and T V_k = T X^T U_k / S_k (V_k = X^T U_k / S_k).
        xc = u[:, :keep] * s[:keep]
        tc = (td @ (xd.T @ u[:, :keep])) / s[:keep]
    else:
        xc, tc = xd, td
    r = tc - w0d @ xc  # the change the outputs need
    m_inv = _metric_inverse(preserve, preserve_weight, xd.shape[0])
    if m_inv is None:
        gram = xc.T @ xc
        delta = r @ torch.linalg.solve(gram, xc.T)
    else:
        gram = xc.T @ m_inv @ xc
        delta = r @ torch.linalg.solve(gram, xc.T @ m_inv)
    evals = torch.linalg.eigvalsh(gram)
    before, after = _residuals(w0d, delta, xd, td)
    _, constrained = _residuals(w0d, delta, xc, tc)
    condition = float((evals[-1] / evals[0]).sqrt())
    return Solve(delta.float(), before, after, constrained, condition, keep)


def uce(
    w0: torch.Tensor,
    c: torch.Tensor,
    target: torch.Tensor,
    preserve: Gram | None = None,
    lam: float = 0.1,
    preserve_scale: float = 1.0,
) -> Solve:
    """UCE's edit of one layer (module doc): concept inputs C toward `target` (W0 A), retain
    inputs P kept, everything else held by lam."""
    w0d, cd, td = w0.double(), c.double(), target.double()
    gram = lam * torch.eye(cd.shape[0], dtype=torch.float64) + cd @ cd.T
    if preserve is not None and preserve.count:
        # Per token vector, the retain set weighs `preserve_scale` times the concept's, so
        # the balance does not shift with the sizes of the two sets.
        gram = gram + preserve_scale * (cd.shape[1] / preserve.count) * preserve.matrix
    delta = torch.linalg.solve(gram, ((td - w0d @ cd) @ cd.T).T).T
    evals = torch.linalg.eigvalsh(gram)
    before, after = _residuals(w0d, delta, cd, td)
    return Solve(delta.float(), before, after, after, float(evals[-1] / evals[0]), cd.shape[1])
