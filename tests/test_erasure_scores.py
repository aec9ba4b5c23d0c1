"""Erasure scores that damage cannot game (issue 15): degenerate images are flagged, and a
patch that blacks out its concept scores a clean-erasure rate near 0 although UA calls it a
perfect erasure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_conceptguard

from bench.minicanvas.erasure_scores import Reference, degenerate_flags
from bench.minicanvas.quality import Cell, Judged
from bench.minicanvas.render import render
from bench.minicanvas.world import NONE_OBJECT, STYLES, held_out_prompt

MODEL = Path(__file__).resolve().parents[1] / "models" / "minicanvas"


def _judged(cells: list[Cell], images: torch.Tensor) -> Judged:
    n = len(cells)
    return Judged(cells, images, np.zeros(n, int), np.zeros(n, int), np.ones(n, bool))


def _renders(obj: str, seed: int) -> tuple[list[Cell], torch.Tensor]:
    rng = np.random.default_rng(seed)
    cells = [Cell("circle", s, seed, held_out_prompt("circle", s)) for s in STYLES]
    images = np.stack([render(obj, s, rng) for s in STYLES])
    return cells, torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def test_real_renders_are_not_degenerate_and_flat_frames_are():
    cells, objects = _renders("circle", 0)
    _, patterns = _renders(NONE_OBJECT, 1)
    reference = Reference.from_base(
        [_judged(cells, objects), _judged(cells, patterns)], kind="object"
    )
    _, fresh_patterns = _renders(NONE_OBJECT, 2)
    assert not degenerate_flags(fresh_patterns, cells, "object", reference)["any"].any()
    noise = torch.randn(len(cells), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    black = (-0.9 + 0.05 * noise).clamp(-1, 1)
    white = (0.95 + 0.02 * noise).clamp(-1, 1)
    grey = 0.02 * noise
    flags = degenerate_flags(black, cells, "object", reference)
    assert flags["near_black"].all() and flags["any"].all()
    assert degenerate_flags(white, cells, "object", reference)["near_white"].all()
    assert degenerate_flags(grey, cells, "object", reference)["near_constant"].all()
    # A faded copy of a real render: its contrast is far below the base's for that style.
    faded = 0.2 * fresh_patterns
    assert degenerate_flags(faded, cells, "object", reference)["low_contrast"].all()


@pytest.fixture(scope="module")
def blackout_file(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.negative_control import blackout_patch

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    path = tmp_path_factory.mktemp("blackout") / "blackout-circle.safetensors"
    blackout_patch(pipe, "circle", progress=False).save(path)
    return path


def test_a_blackout_patch_is_no_clean_erasure(blackout_file, tmp_path):
    out = tmp_path / "q.json"
    proc = run_conceptguard(
        "bench", "quality", "--model", str(MODEL), "--patch", str(blackout_file),
        "--concept", "circle", "--cells", "ci", "--seeds", "2", "--json", str(out),
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    block = json.loads(out.read_text())["patched"]
    # What the old headline said: a perfect erasure.
    assert block["UA"] >= 0.9, block
    # What the new one says: nothing was erased cleanly, the images are broken.
    assert block["clean"] <= 0.1 and block["clean_synonyms"] <= 0.1, block
    assert block["degenerate"] >= 0.9, block
    counts = block["degenerate_counts"]
    assert counts["near_black"] >= 0.9 * counts["cells"], counts
    assert block["anchor_distance"] > 3 * block["anchor_distance_base"] or (
        block["anchor_distance"] > 0.05
    ), block
    assert "degenerate images on its 8 cells" in proc.stdout
