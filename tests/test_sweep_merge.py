"""`bench erasure-sweep --merge`: sweeps of disjoint concepts join into the sweep of all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_conceptguard

from bench.minicanvas.world import OBJECTS

WHOLE = Path(__file__).resolve().parents[1] / "docs" / "results" / "hirm_minicanvas.json"


def _part(whole: dict, concepts: list[str]) -> dict:
    """The sweep `whole` would have been, run on `concepts` only."""
    variants = {
        v: {"per_concept": {c: s["per_concept"][c] for c in concepts}}
        for v, s in whole["variants"].items()
    }
    return {
        "schema": whole["schema"],
        "method": whole["method"],
        "variants": variants,
        "config": {**whole["config"], "concepts": concepts},
        "timings": {"total_s": 10.0},
    }


@pytest.fixture
def halves(tmp_path):
    whole = json.loads(WHOLE.read_text())
    concepts = whole["config"]["concepts"]
    paths = []
    for i, chosen in enumerate((concepts[:5], concepts[5:])):
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps(_part(whole, chosen)))
        paths.append(path)
    return whole, paths


def test_merged_halves_equal_the_whole_sweep(halves, tmp_path):
    whole, (a, b) = halves
    out = tmp_path / "merged.json"
    proc = run_conceptguard("bench", "erasure-sweep", "--merge", str(a), str(b), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 sweeps joined" in proc.stdout and "criteria" in proc.stdout
    assert "clean" in proc.stdout.splitlines()[0]  # the headline column comes first
    merged = json.loads(out.read_text())
    assert merged["config"]["concepts"] == whole["config"]["concepts"]
    assert merged["config"]["merged_from"] == [str(a), str(b)]
    assert merged["timings"]["total_s"] == 20.0
    for variant, summary in whole["variants"].items():
        ours = merged["variants"][variant]
        for kind in ("objects", "styles", "all"):
            for field, value in summary[kind]["mean"].items():
                assert ours[kind]["mean"][field] == pytest.approx(value), (variant, kind, field)
            assert ours[kind]["criteria"] == summary[kind]["criteria"]


def test_markdown_table_heads_with_the_clean_erasure_rate(halves):
    whole, (a, b) = halves
    proc = run_conceptguard("bench", "erasure-sweep", "--merge", str(a), str(b), "--markdown")
    assert proc.returncode == 0, proc.stderr
    header, _, *rows = proc.stdout.strip().splitlines()
    assert header.startswith("| variant | concepts | clean | UA |")
    s_mean = next(r for r in rows if r.startswith("| S | objects, mean |"))
    clean = whole["variants"]["S"]["objects"]["mean"]["clean"]
    assert f"| {100 * clean:.1f}% |" in s_mean


def test_refuses_sweeps_that_do_not_join(halves, tmp_path):
    whole, (a, b) = halves
    out = tmp_path / "merged.json"
    overlap = tmp_path / "overlap.json"
    overlap.write_text(json.dumps(_part(whole, OBJECTS[:2])))
    other_seeds = tmp_path / "seeds.json"
    part = json.loads(b.read_text())
    part["config"]["seeds"] = [1, 2]
    other_seeds.write_text(json.dumps(part))
    for files, message in (
        ([a, overlap], "more than one sweep: circle, square"),
        ([a, other_seeds], "config seeds"),
        ([a, tmp_path / "missing.json"], "missing.json"),
    ):
        proc = run_conceptguard(
            "bench", "erasure-sweep", "--merge", *map(str, files), "--json", str(out)
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()
