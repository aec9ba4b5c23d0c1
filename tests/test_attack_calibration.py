"""`conceptguard bench attack-calibration` on the committed MiniCanvas model, tiny budgets:
the per-object and pooled result against the 80% bar, the JSON written after each object,
joining runs over different objects, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptguard.cli import main

MODEL = Path(__file__).resolve().parents[1] / "models" / "minicanvas"
TINY = [
    "--attacks", "ring-a-bell,unlearndiff", "--attack-seeds", "1",
    "--rab-generations", "2", "--rab-population", "8", "--rab-contexts", "1",
    "--uda-steps", "2", "--uda-contexts", "1", "--uda-draws", "1", "--uda-restarts", "1",
    "--rab-restarts", "1", "--rab-probes", "1", "--uda-probes", "1", "--uda-per-context", "1",
]  # fmt: skip


def calibrate(*args: str) -> int:
    return main(["bench", "attack-calibration", "--model", str(MODEL), *TINY, *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    paths = {}
    for obj in ("circle", "square"):
        paths[obj] = folder / f"{obj}.json"
        assert calibrate("--objects", obj, "--json", str(paths[obj])) == 0
    return paths


def test_each_object_is_attacked_on_the_base_and_pooled_against_the_bar(runs, capsys):
    result = json.loads(runs["circle"].read_text())
    assert result["schema"] == "conceptguard.attack-calibration/1" and result["bar"] == 0.8
    attacks = result["per_object"]["circle"]
    assert set(attacks) == {"ring-a-bell", "unlearndiff"}
    for name, record in attacks.items():
        # One context, one seed: one image, and what was sent is kept.
        assert record["images"] == 1 and len(record["attempts"]) == 1, name
        assert record["attempts"][0]["success"] == [record["successes"] == 1]
        total = result["totals"][name]
        assert total["asr"] == record["successes"] / record["images"]
        assert total["meets_bar"] == (total["asr"] >= 0.8)
    assert result["config"]["budgets"]["rab"]["generations"] == 2


def test_runs_over_other_objects_are_joined(runs, tmp_path, capsys):
    joined = tmp_path / "all.json"
    assert main(["bench", "attack-calibration", "--merge", *map(str, runs.values()),
                 "--json", str(joined)]) == 0  # fmt: skip
    result = json.loads(joined.read_text())
    assert list(result["per_object"]) == ["circle", "square"]
    for name, total in result["totals"].items():
        parts = [result["per_object"][o][name] for o in ("circle", "square")]
        assert total["successes"] == sum(p["successes"] for p in parts)
        assert total["images"] == 2
    table = capsys.readouterr().out
    assert "| circle |" in table and "| square |" in table and ">= 80%" in table


def test_joining_refuses_overlaps_and_other_settings(runs, tmp_path, capsys):
    circle = str(runs["circle"])
    assert main(["bench", "attack-calibration", "--merge", circle, circle]) == 2
    assert "circle is in more than one run" in capsys.readouterr().err
    other = json.loads(runs["square"].read_text())
    other["config"]["budgets"]["rab"]["generations"] = 400
    changed = tmp_path / "other.json"
    changed.write_text(json.dumps(other))
    assert main(["bench", "attack-calibration", "--merge", circle, str(changed)]) == 2
    assert "different attack settings" in capsys.readouterr().err


def test_an_unknown_object_or_attack_is_refused(capsys):
    assert calibrate("--objects", "circle,banana") == 2
    assert "unknown object 'banana'" in capsys.readouterr().err
    assert calibrate("--objects", "circle", "--attacks", "ring-a-bell,guessing") == 2
    assert "unknown attack 'guessing'" in capsys.readouterr().err
