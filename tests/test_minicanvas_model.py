"""The committed MiniCanvas model: stock loading, the cheap CI quality tier with its accuracy
floor, the default served model, and a HiRM patch that really erases on it.

The floors are below the measured full-grid figures (docs/BENCHMARKS.md) by a margin for the
few cells and one seed of the CI tier; they catch a broken or replaced model, not 1-point drifts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import run_conceptguard

MODEL = Path(__file__).resolve().parents[1] / "models" / "minicanvas"
FLOOR = {"style_acc": 0.85, "object_acc": 0.80}


def test_stock_diffusers_loads_it_offline(tmp_path):
    # A plain interpreter with no ConceptGuard import: only diffusers and the folder.
    script = (
        "import torch; from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(MODEL)!r})\n"
        "image = pipe('a drawing of a star in neon style', num_inference_steps=10,"
        " generator=torch.Generator().manual_seed(0)).images[0]\n"
        "print(image.size)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("(32, 32)")


def test_the_model_is_small_enough_for_git():
    total = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, total
    assert (MODEL / "MODEL_CARD.md").exists() and (MODEL / "training.json").exists()


def test_it_is_the_default_served_model():
    from server.default_model import default_model_path

    assert default_model_path() == MODEL


def test_ci_quality_tier_meets_the_floor(tmp_path):
    out, grid = tmp_path / "q.json", tmp_path / "grid.png"
    proc = run_conceptguard(
        "bench", "quality", "--model", str(MODEL), "--cells", "ci", "--seeds", "1",
        "--json", str(out), "--grid", str(grid), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["schema"] == "conceptguard.minicanvas.quality/2"
    for judge in result["judges"].values():
        assert judge["style_acc"] >= 0.98 and judge["object_acc"] >= 0.99, judge
    for key, floor in FLOOR.items():
        assert result["base"][key] >= floor, (key, result["base"])
    assert result["gates"]["judge_style"] and result["gates"]["judge_object"]
    from PIL import Image

    assert Image.open(grid).size[0] > 0


def test_a_hirm_patch_erases_its_object_and_keeps_the_others():
    import torch
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.erasure_settings import hirm_config
    from bench.minicanvas.judge import load_judge
    from bench.minicanvas.quality import EvalSettings, Evaluator
    from bench.minicanvas.world import OBJECTS, STYLES
    from erasure.hirm import erase_hirm

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    judges = [load_judge(MODEL / "judges" / f"{n}.safetensors") for n in ("pooled", "strided")]
    evaluator = Evaluator(
        pipe, judges, EvalSettings(seeds=1, objects=OBJECTS[:4], styles=STYLES[:4])
    )
    base = evaluator.judge(evaluator.grid(), "base")
    patches = erase_hirm(pipe, hirm_config(["circle"], "S")).patches
    blocks, _ = evaluator.measure(base, patches, ["circle"], joint=False)
    block = blocks["circle"]
    assert block["clean"] >= 0.75 and block["clean_synonyms"] >= 0.75, block
    assert block["degenerate"] == 0.0, block
    assert block["IRA"] >= block["IRA_base"] - 0.2, block
    assert block["CRA"] >= block["CRA_base"] - 0.2, block
