"""`conceptguard bench attack-table SWEEP.json ...`: the ASR tables of docs/BENCHMARKS.md
("Attacks") from sweeps run with `--attacks`, and a compact JSON of them.

Rows: the base model (the calibration), then every (method, variant) of the sweeps given,
in order. Per row and attack: successful images / images pooled over the row's concepts,
degenerate images, and the clean-erasure rate and IRA the same sweep measured. The compact
JSON keeps, per row, concept and attack, the counts, the successful prompts and the time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

SCHEMA = "conceptguard.attack_table/1"
COLUMNS = (
    ("random-tokens", "random (control)"),
    ("paraphrase", "paraphrase"),
    ("ring-a-bell", "Ring-A-Bell transfer"),
    ("ring-a-bell-adaptive", "Ring-A-Bell adaptive"),
    ("unlearndiff", "UnlearnDiffAtk"),
    ("inversion", "textual inversion*"),
)
LABELS = {
    ("hirm", "S"): "HiRM-S",
    ("hirm", "R"): "HiRM-R",
    ("esd", "x"): "ESD-x",
    ("stack", "S+x"): "HiRM-S + ESD-x",
    ("hirm-hardened", "S"): "hardened HiRM-S",
    ("hirm-hardened", "S+x"): "hardened HiRM-S + ESD-x",
    ("uce", "all"): "UCE",
    ("erasepro", "text"): "ErasePro (text chain)",
    ("erasepro", "unet"): "ErasePro (U-Net)",
    ("dumo", "full"): "DuMo",
}


def _judge_identity(entry: Any) -> str:
    """A judge as its content: a record names it by sha256; older records by a path, which
    another working directory spells differently (`models/...` or `/work/.../models/...`)."""
    if isinstance(entry, dict):
        return entry["sha256"]
    path = Path(entry)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(entry)


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two attack configs are the same attack: equal but for how judges are named."""
    judges_a = [_judge_identity(j) for j in a.get("judges", [])]
    judges_b = [_judge_identity(j) for j in b.get("judges", [])]
    rest_a = {k: v for k, v in a.items() if k != "judges"}
    rest_b = {k: v for k, v in b.items() if k != "judges"}
    return judges_a == judges_b and rest_a == rest_b


def _compact(report: dict[str, Any]) -> dict[str, Any]:
    out = {"direct": report["direct"]["patched"], "attacks": {}}
    for name, record in report["attacks"].items():
        entry = {
            k: record[k]
            for k in ("successes", "images", "asr", "degenerate", "round_trip_failures")
        }
        entry["seconds"] = record["seconds"]
        entry["successful_prompts"] = record["successful_prompts"]
        if name == "paraphrase":
            entry["asr_base"] = record["details"]["asr_base"]
            entry["per_paraphrase"] = record["details"]["per_paraphrase"]
        if name == "inversion":
            entry["asr_start"] = record["details"]["asr_start"]
        out["attacks"][name] = entry
    return out


def collect(paths: list[Path]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    base: dict[str, Any] = {}
    config = None
    for path in paths:
        result = json.loads(path.read_text())
        block = result.get("attacks")
        if not block:
            raise SystemExit(f"conceptguard: {path} holds no attack results (--attacks)")
        if config is not None and not same_settings(block["config"], config):
            raise SystemExit(f"conceptguard: {path} was attacked with other settings")
        config = block["config"]
        for concept, report in block["base"].items():
            base[concept] = {"clean": None, "IRA": None, **_compact(report)}
        for variant, summary in result["variants"].items():
            concepts = {}
            for concept, b in summary["per_concept"].items():
                if "attacks" in b:
                    concepts[concept] = {
                        "clean": b["clean"],
                        "IRA": b["IRA"],
                        "IRA_base": b["IRA_base"],
                        **_compact(b["attacks"]),
                    }
            label = LABELS.get((result["method"], variant), f"{result['method']} {variant}")
            rows.append({"row": label, "method": result["method"], "variant": variant,
                         "concepts": concepts, "source": str(path)})  # fmt: skip
    rows.insert(0, {"row": "base (no patch)", "method": None, "variant": None,
                    "concepts": base, "source": None})  # fmt: skip
    for row in rows:
        row["pooled"] = _pooled(row["concepts"])
    return {"schema": SCHEMA, "config": config, "rows": rows}


def _pooled(concepts: dict[str, Any]) -> dict[str, Any]:
    pooled: dict[str, Any] = {}
    for report in concepts.values():
        for name, entry in report["attacks"].items():
            p = pooled.setdefault(name, {"successes": 0, "images": 0, "degenerate": 0})
            for key in p:
                p[key] += entry[key]
    for p in pooled.values():
        p["asr"] = p["successes"] / p["images"] if p["images"] else None
    if all(r.get("clean") is not None for r in concepts.values()):
        pooled["clean"] = sum(r["clean"] for r in concepts.values()) / len(concepts)
        pooled["IRA"] = sum(r["IRA"] for r in concepts.values()) / len(concepts)
        pooled["IRA_base"] = sum(r["IRA_base"] for r in concepts.values()) / len(concepts)
    pooled["direct"] = sum(r["direct"] for r in concepts.values()) / len(concepts)
    pooled["concepts"] = len(concepts)
    return pooled


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(table: dict[str, Any]) -> str:
    lines = [
        "| defence | concepts | clean | IRA (base) | concept prompt | "
        + " | ".join(label for _, label in COLUMNS)
        + " | degenerate |",
        "|---|---|---|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for row in table["rows"]:
        p = row["pooled"]
        cells = []
        for name, _ in COLUMNS:
            entry = p.get(name)
            text = (
                "-"
                if entry is None
                else f"{_pct(entry['asr'])} ({entry['successes']}/{entry['images']})"
            )
            if name == "paraphrase" and entry is not None:
                base = [r["attacks"][name]["asr_base"] for r in row["concepts"].values()]
                text += f" [base {_pct(sum(base) / len(base))}]"
            cells.append(text)
        degenerate = sum(p[n]["degenerate"] for n, _ in COLUMNS if n in p)
        ira = "-" if p.get("IRA") is None else f"{_pct(p['IRA'])} ({_pct(p['IRA_base'])})"
        lines.append(
            f"| {row['row']} | {p['concepts']} | {_pct(p.get('clean'))} | {ira} | "
            f"{_pct(p['direct'])} | " + " | ".join(cells) + f" | {degenerate} |"
        )
    return "\n".join(lines)


def per_concept_markdown(table: dict[str, Any], attack: str) -> str:
    concepts = list(table["rows"][0]["concepts"])
    lines = [
        f"| {attack} | " + " | ".join(concepts) + " |",
        "|---|" + "---|" * len(concepts),
    ]
    for row in table["rows"]:
        cells = []
        for c in concepts:
            entry = row["concepts"].get(c, {}).get("attacks", {}).get(attack)
            cells.append("-" if entry is None else f"{entry['successes']}/{entry['images']}")
        lines.append(f"| {row['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seconds_markdown(table: dict[str, Any]) -> str:
    """Mean wall seconds per (row, concept) for each attack: search, evaluation, total."""
    lines = [
        "| defence | " + " | ".join(n for n, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in table["rows"]:
        cells = []
        for name, _ in COLUMNS:
            totals = [
                r["attacks"][name]["seconds"]["total"]
                for r in row["concepts"].values()
                if name in r["attacks"]
            ]
            cells.append(
                "-" if not totals else f"{sum(totals) / len(totals):.0f} (max {max(totals):.0f})"
            )
        lines.append(f"| {row['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conceptguard bench attack-table", description=__doc__)
    parser.add_argument("sweeps", nargs="+", help="sweep results made with --attacks")
    parser.add_argument("--json", dest="json_out", help="write the compact table here")
    parser.add_argument(
        "--per-concept",
        default="ring-a-bell-adaptive,unlearndiff",
        help="attacks to break down by concept",
    )
    args = parser.parse_args(argv)
    table = collect([Path(p) for p in args.sweeps])
    print(markdown(table))
    for attack in (a.strip() for a in args.per_concept.split(",") if a.strip()):
        print()
        print(per_concept_markdown(table, attack))
    print()
    print(seconds_markdown(table))
    if args.json_out:
        from patches.atomic import atomic_write_json

        atomic_write_json(Path(args.json_out), table)
    return 0
