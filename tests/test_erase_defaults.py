"""What `conceptguard erase ...` does when the user names only the concept (issue 15): the
built-in retain set and the model's own captions, templates in the model's prompt shapes,
held-out check prompts and the verdict that ends every report. The README's HiRM one-liner
runs as written and its verdict is OK; a patch trained the way the old README did (lr 1e-3,
no retain set) is flagged as likely to damage other concepts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from conftest import run_conceptguard

from bench.minicanvas.world import HELD_OUT_TEMPLATE, IMPLICIT_EVAL_TEMPLATE
from erasure.default_prompts import (
    default_prompts,
    default_templates,
    general_prompts,
    model_prompts,
    names_any,
)
from erasure.prompts import DEFAULT_TEMPLATES, ConceptSpec

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "minicanvas"
CIRCLE = ConceptSpec("circle", ("disc",), "pattern")


def test_the_general_retain_set_ships_with_the_package():
    prompts = general_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)


def test_minicanvas_ships_its_training_captions_and_never_the_evaluation_prompts():
    captions = model_prompts(MODEL)
    assert len(captions) > 1000
    held_out = re.compile(
        "^"
        + re.escape(HELD_OUT_TEMPLATE).replace(r"\{object\}", ".+").replace(r"\{style\}", ".+")
        + "$"
    )
    assert not any(held_out.match(c) for c in captions)
    assert not any(c.startswith(IMPLICIT_EVAL_TEMPLATE.split("{")[0]) for c in captions)
    assert model_prompts(ROOT / "docs") == []


def test_retain_and_check_prompts_never_name_the_concept_and_do_not_overlap():
    chosen = default_prompts(MODEL, [CIRCLE])
    assert chosen.retain and chosen.probes
    assert not set(chosen.retain) & set(chosen.probes)
    for prompt in chosen.retain + chosen.probes:
        assert not names_any(prompt, [CIRCLE]), prompt
    assert any("square" in p for p in chosen.retain)  # the other objects are held in place
    assert any("a cup of coffee" in p for p in chosen.retain + chosen.probes)
    assert names_any("A Disc in neon style", [CIRCLE])
    assert not names_any("a discus thrower", [CIRCLE])


def test_templates_follow_the_models_own_prompt_shapes():
    templates = default_templates(MODEL, [CIRCLE], "object")
    assert templates[: len(DEFAULT_TEMPLATES["object"])] == DEFAULT_TEMPLATES["object"]
    own = templates[len(DEFAULT_TEMPLATES["object"]) :]
    assert "a {concept} in neon style" in own and "a plain {concept}" in own
    assert all(t.count("{concept}") == 1 and "circle" not in t for t in own)
    assert default_templates(ROOT / "docs", [CIRCLE], "object") == DEFAULT_TEMPLATES["object"]


def _readme_command(method: str) -> list[str]:
    """The README tour's `conceptguard erase <method>` line, as a user would paste it."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^(?:# )?conceptguard erase {method} .*?(?<!\\)$", text, re.S | re.M)
    assert match, f"no `conceptguard erase {method}` line in README.md"
    line = re.sub(r"\\\n#?\s*", " ", match.group(0)).removeprefix("# ")
    return shlex.split(line)[1:]


def test_the_readme_hirm_line_runs_as_written_and_its_verdict_is_ok(tmp_path):
    args = _readme_command("hirm")
    assert "--lr" not in args and "--retain-prompts" not in args and "--templates-file" not in args
    out = args.index("-o") + 1
    args[out] = str(tmp_path / args[out])
    args[args.index("--model") + 1] = str(MODEL)
    report = tmp_path / "report.json"
    proc = run_conceptguard(*args, "--json", str(report), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verdict: OK" in proc.stdout, proc.stdout
    summary = json.loads(report.read_text())
    (verdict,) = summary["verdict"]
    assert verdict["ok"] and verdict["selectivity"] >= 4, verdict
    assert "captions.txt" in summary["retain_source"] and "built-in" in summary["retain_source"]


def test_the_old_readme_line_is_flagged_as_damaging(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(DEFAULT_TEMPLATES["object"]) + "\n")
    report = tmp_path / "report.json"
    proc = run_conceptguard(
        "erase", "hirm", "--model", str(MODEL), "--concept", "circle", "--synonyms", "disc",
        "--anchor", "pattern", "--lr", "1e-3", "--steps", "60", "--retain-prompts", "none",
        "--templates-file", str(templates), "-o", str(tmp_path / "old.safetensors"),
        "--json", str(report), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verdict: WARNING" in proc.stdout and "likely to damage" in proc.stdout
    (verdict,) = json.loads(report.read_text())["verdict"]
    assert not verdict["ok"] and verdict["selectivity"] < 4, verdict
    # The casualties it names are the other MiniCanvas objects' prompts.
    assert any(
        any(o in prompt for o in ("square", "box", "cross", "ring", "heart"))
        for prompt, _ in verdict["most_moved"]
    ), verdict["most_moved"]
