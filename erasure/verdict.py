"""The verdict that ends every erase report: did the patch stay local, and did it erase?

Measured on held-out check prompts (default_prompts.py: prompts the patch never trained on):
how far their representation moved (text states for HiRM, noise predictions for ESD) next
to how far the concept's own prompts moved. A patch that moves unrelated prompts nearly as
much as the concept's is likely to damage other concepts; the most-moved check prompts say
which. Thresholds are calibrated on MiniCanvas (docs/ERASURE.md): the README's old HiRM
one-liner (lr 1e-3, no retain set) moved check prompts 54% on average against the concept's
91% (ratio 1.7) and erased square with circle; the default run moved them 9% against 82%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# The concept's prompts must move at least this many times more than the check prompts.
MIN_SELECTIVITY = 4.0
# Share of the target gap (after / before) above which HiRM S/V did not reach its target.
MAX_GAP_LEFT = 0.35
SHOW = 3  # most-moved check prompts named in the verdict


@dataclass
class Verdict:
    ok: bool
    check_prompts: int
    check_drift_mean: float | None
    check_drift_p95: float | None
    concept_shift: float
    selectivity: float | None
    most_moved: list[tuple[str, float]]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        head = "verdict: OK" if self.ok else "verdict: WARNING"
        if self.check_drift_mean is None:
            body = [f"{head} - no held-out check prompts, drift not measured"]
        else:
            moved = ", ".join(f"{p!r} {100 * d:.1f}%" for p, d in self.most_moved)
            body = [
                f"{head} - {self.check_prompts} held-out prompts moved "
                f"{100 * self.check_drift_mean:.1f}% on average (95th percentile "
                f"{100 * self.check_drift_p95:.1f}%), the concept's own prompts "
                f"{100 * self.concept_shift:.1f}% ({self.selectivity:.1f}x more)",
                f"  most moved: {moved}",
            ]
        return body + [f"  warning: {w}" for w in self.warnings]


def judge_patch(
    check_drift: dict[str, float],
    concept_shift: float,
    retained: bool,
    gap_left: float | None = None,
) -> Verdict:
    """The verdict from per-check-prompt drift and the concept prompts' shift (same measure).

    `retained`: whether a retain set held other prompts during training; `gap_left`: HiRM
    S/V's remaining distance to the target (after / before), None where it has none."""
    warnings = []
    mean = p95 = selectivity = None
    most: list[tuple[str, float]] = []
    if check_drift:
        values = np.array(list(check_drift.values()))
        mean, p95 = float(values.mean()), float(np.quantile(values, 0.95))
        selectivity = concept_shift / max(mean, 1e-12)
        most = sorted(check_drift.items(), key=lambda item: -item[1])[:SHOW]
        if selectivity < MIN_SELECTIVITY:
            warnings.append(
                f"likely to damage other concepts: unrelated prompts moved "
                f"{100 * mean:.1f}% on average, only {selectivity:.1f}x less than the "
                f"concept's (at least {MIN_SELECTIVITY:g}x expected); the most moved above "
                "are the likely casualties. Keep the default retain set, or lower --lr/--steps."
            )
    if not retained:
        warnings.append(
            "trained without retain prompts: nothing held other prompts in place "
            "(drop --retain-prompts none to use the default set)"
        )
    if gap_left is not None and gap_left > MAX_GAP_LEFT:
        warnings.append(
            f"erasure may be incomplete: the concept's prompts are still {100 * gap_left:.0f}% "
            f"of the way from their target (at most {100 * MAX_GAP_LEFT:.0f}% expected); "
            "raise --steps or --lr"
        )
    return Verdict(
        ok=not warnings,
        check_prompts=len(check_drift),
        check_drift_mean=mean,
        check_drift_p95=p95,
        concept_shift=concept_shift,
        selectivity=selectivity,
        most_moved=most,
        warnings=warnings,
    )
