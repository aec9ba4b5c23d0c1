"""What `conceptguard erase uce|erasepro` print: cost, files, and a row per edited layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasure.verdict import Verdict, judge_patch
from patches.atomic import atomic_write_json


def verdicts(checks: list[dict[str, Any]], retained: bool) -> list[dict[str, Any]]:
    """erasure/verdict.py's verdict per patch, from the method's shift and drift figures."""
    return [
        judge_patch(
            c["check_drift"], c["concept_shift"], retained=retained, gap_left=c.get("gap_left")
        ).to_dict()
        for c in checks
    ]


def print_report(summary: dict[str, Any]) -> None:
    mib = summary["peak_memory_bytes"] / 2**20
    label = "GPU allocated" if summary["peak_memory_kind"] == "cuda_allocated" else "process RSS"
    print(
        f"{summary['title']} for {', '.join(summary['concepts'])}: {summary['seconds']:.2f} s "
        f"({summary['cpu_seconds']:.2f} s of CPU), "
        f"peak memory {mib:.0f} MiB ({label}); {summary['pairs']} aligned token pairs from "
        f"{summary['prompts']} prompt pairs; retain prompts: {summary['retain_source']}"
    )
    for item in summary["patches"]:
        print(f"  wrote {item['path']}  {item['file_bytes'] / 1024:.1f} KiB  id {item['id'][:16]}")
    print(
        f"  {'layer':<58}{'rank':>5}{'residual before':>16}{'after':>10}{'imposed':>10}"
        f"{'|dW|':>9}{'|dW|/|W|':>9}{'cond':>9}"
    )
    for row in summary["layers"]:
        print(
            f"  {row['layer'][-58:]:<58}{row.get('rank', row['constraints']):>5}"
            f"{row['residual_before']:>16.4f}{row['residual_after']:>10.2e}"
            f"{row['residual_constrained']:>10.1e}{row['delta_norm']:>9.4f}"
            f"{row['delta_relative']:>9.4f}{row['condition']:>9.1e}"
        )
    cut = [row for row in summary["layers"] if row.get("dropped")]
    if cut:
        worst = max(row["dropped"] for row in cut)
        print(
            f"  {len(cut)} layer(s) had a rank above the per-row server's limit and keep their "
            f"largest directions only (at most {100 * worst:.2f}% of the edit dropped)"
        )
    for readout in summary.get("readouts", []):
        print(
            f"  {readout['component']} ({readout['readout']} states): aligned target tokens "
            f"{readout['readout_gap_before']:.3f} -> {readout['readout_gap_after']:.3f} from "
            f"the anchor's; retain prompts moved {readout['retain_drift']:.4f} (relative)"
        )
    print(
        "  (residual: |W X - T| / |T| over every aligned token; imposed: on the constraints "
        "solved exactly)"
    )
    for verdict in summary.get("verdicts", []):
        print("\n".join(Verdict(**verdict).lines()))


def write_json(path: str | None, summary: dict[str, Any]) -> None:
    if path:
        atomic_write_json(Path(path), summary)
