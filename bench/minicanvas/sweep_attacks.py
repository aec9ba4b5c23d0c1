"""ASR columns for `bench erasure-sweep --attacks LIST` (erasure/attacks).

For every (variant, concept) row the sweep measures, the attacks run against that row's
patch stack; once per concept they also run against the base model (the `base` row: the
calibration - a search must succeed where nothing defends). Budgets are the attack
command's flags (--rab-generations, --uda-steps, ...). With --cache, the base rows and the
transfer searches (which never see a defence) are kept there and reused by later sweeps
with the same attack settings, so one base row serves every method's sweep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.minicanvas.attack_table import same_settings
from erasure.attacks.concepts import minicanvas_concept
from erasure.attacks.generation import Sampling
from erasure.attacks.judging import find_judges
from erasure.attacks.runner import AttackSuite, add_budget_flags, attack_names, budgets_from_args

BASE = "base"


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attacks",
        help="also attack every row (and the base) with these: comma-separated names from "
        "`conceptguard attack --help`, or all; adds ASR columns",
    )
    parser.add_argument("--attack-seeds", type=int, default=2, help="images per attempt")
    add_budget_flags(parser)


class SweepAttacks:
    def __init__(self, suite: AttackSuite, store: Path | None, method: str):
        self.suite, self.store, self.method = suite, store, method
        self.results: dict[str, list] = {}  # per row: AttackResults (for the PNG sheet)
        self.bases: dict[str, dict[str, Any]] = {}  # per concept: the base row's report

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: Path) -> SweepAttacks | None:
        if not args.attacks:
            return None
        sampling = Sampling(tuple(5000 + i for i in range(args.attack_seeds)))
        store = Path(args.cache) / "attacks" if args.cache else None
        suite = AttackSuite(
            attack_names(args.attacks),
            budgets_from_args(args),
            sampling,
            find_judges(model),
            store=store,
        )
        return cls(suite, store, args.method)

    def _key(self) -> str:
        text = json.dumps(self.suite.record(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def measure(self, pipe: Any, patches: list, concept: str, row: str) -> dict[str, Any]:
        """The attacks on `patches` (row `row`); the base row of the concept first, so the
        calibration is known before any defence is measured. With a store, each report is
        also kept there as soon as it exists."""
        self.base(pipe, concept)
        report = self._run(pipe, patches, concept, row)
        self._keep(f"{self.method}-{row}-{concept}", report)
        return report

    def _keep(self, name: str, report: dict[str, Any]) -> None:
        if self.store is not None:
            from patches.atomic import atomic_write_json

            path = self.store / "rows" / f"{name.replace('+', '-')}-{self._key()}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, report)

    def _run(self, pipe: Any, patches: list, concept: str, row: str) -> dict[str, Any]:
        def show(result) -> None:
            s = result.summary()
            print(
                f"[attack] {row} {concept} {result.attack}: ASR {s['successes']}/{s['images']} "
                f"degenerate {s['degenerate']} {result.seconds['total']:.0f}s",
                flush=True,
            )

        report, results = self.suite.run(pipe, patches, minicanvas_concept(concept), None, show)
        for result in results:
            result.attack = f"{concept} {result.attack}"
        self.results.setdefault(row, []).extend(results)
        return report

    def base(self, pipe: Any, concept: str) -> dict[str, Any]:
        """The base row's report for `concept` (from the store when it holds one)."""
        if concept in self.bases:
            return self.bases[concept]
        path = None if self.store is None else self.store / f"base-{concept}-{self._key()}.json"
        if path is not None and path.exists():
            report = json.loads(path.read_text())
        else:
            report = self._run(pipe, [], concept, BASE)
            if path is not None:
                from patches.atomic import atomic_write_json

                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, report)
        self.bases[concept] = report
        return report

    def summary(self, result: dict[str, Any], concepts: list[str], pipe: Any) -> dict[str, Any]:
        base = {c: self.base(pipe, c) for c in concepts}
        return summary(result, base, self.suite.record())

    def write_sheets(self, stem: Path) -> list[Path]:
        """One PNG per row: each concept's attacks, successes then the rest."""
        from erasure.attacks.results import save_grid

        written = []
        for row, results in self.results.items():
            path = stem.with_name(f"{stem.name}.{row.replace('+', '-')}.attacks.png")
            save_grid(path, results)
            written.append(path)
        return written


def asr_table(rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, Any]]:
    """Per row (base, each variant) and attack: ASR pooled over the row's concepts (successes
    / images), the mean and the worst concept, degenerate images, and per concept."""
    table: dict[str, dict[str, Any]] = {}
    for row, per_concept in rows.items():
        attacks: dict[str, Any] = {}
        for concept, report in per_concept.items():
            for name, record in report["attacks"].items():
                entry = attacks.setdefault(
                    name, {"successes": 0, "images": 0, "degenerate": 0, "per_concept": {}}
                )
                entry["successes"] += record["successes"]
                entry["images"] += record["images"]
                entry["degenerate"] += record["degenerate"]
                entry["per_concept"][concept] = record["asr"]
                if name == "paraphrase":
                    entry.setdefault("per_concept_base", {})[concept] = record["details"][
                        "asr_base"
                    ]
        for entry in attacks.values():
            rates = [v for v in entry["per_concept"].values() if v is not None]
            entry["asr"] = entry["successes"] / entry["images"] if entry["images"] else None
            entry["asr_worst"] = max(rates) if rates else None
            entry["asr_mean"] = float(np.mean(rates)) if rates else None
        direct = [r["direct"]["patched"] for r in per_concept.values()]
        table[row] = {"direct": float(np.mean(direct)), "attacks": attacks}
    return table


def summary(result: dict[str, Any], base_reports: dict[str, dict], config: dict) -> dict:
    """The sweep result's `attacks` block: the base reports, the ASR table, the settings."""
    rows = {BASE: base_reports}
    for variant, block in result["variants"].items():
        rows[variant] = {c: b["attacks"] for c, b in block["per_concept"].items() if "attacks" in b}
    return {"base": base_reports, "table": asr_table(rows), "config": config}


def merged(parts: list[dict[str, Any]], result: dict[str, Any]) -> dict[str, Any] | None:
    """The `attacks` block of sweeps joined by --merge (same attack settings required)."""
    blocks = [p["attacks"] for p in parts if "attacks" in p]
    if not blocks:
        return None
    if len(blocks) != len(parts) or not all(
        same_settings(b["config"], blocks[0]["config"]) for b in blocks
    ):
        raise ValueError("the sweeps were attacked with different settings (or some not at all)")
    base = {c: r for b in blocks for c, r in b["base"].items()}
    return summary(result, base, blocks[0]["config"])


def print_lines(result: dict[str, Any]) -> None:
    attacks = result.get("attacks")
    if not attacks:
        return
    table = attacks["table"]
    names = list(next(iter(table.values()))["attacks"])
    short = {"ring-a-bell-adaptive": "rab-adapt", "ring-a-bell": "rab", "random-tokens": "random"}
    print("ASR (successful images / attempts x seeds, pooled over concepts):")
    print(f"{'row':<14}{'direct':>8}" + "".join(f"{short.get(n, n):>12}" for n in names))
    for row, entry in table.items():
        cells = []
        for name in names:
            value = entry["attacks"].get(name, {}).get("asr")
            cells.append(f"{'-':>12}" if value is None else f"{100 * value:11.1f}%")
        print(f"{row:<14}{100 * entry['direct']:7.1f}%" + "".join(cells))
