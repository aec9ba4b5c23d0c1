"""MiniCanvas plumbing at toy scale: train every stage, load with stock diffusers, resume,
and run the quality benchmark end to end (accuracy is not expected at these step counts)."""

from __future__ import annotations

import json

import pytest
from conftest import run_conceptguard

from bench.minicanvas.train import TrainConfig, Trainer

TOY = TrainConfig(
    judge_steps=20,
    judge_images=600,
    text_steps=5,
    vae_steps=5,
    unet_steps=6,
    unet_images=300,
    unet_batch=16,
)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("mc-work")
    out = tmp_path_factory.mktemp("mc-model")
    Trainer(TOY, work).run(out)
    return work, out


def test_training_writes_a_stock_stable_diffusion_folder(toy_model):
    from diffusers import StableDiffusionPipeline

    _, out = toy_model
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not SD's constant
    assert pipe.tokenizer.model_max_length == 32
    assert sorted(p.name for p in (out / "judges").iterdir()) == [
        "pooled.safetensors",
        "strided.safetensors",
    ]
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["unet_steps"] == TOY.unet_steps
    assert {"judge_pooled", "judge_strided", "text_encoder", "vae", "unet"} <= set(
        summary["stages"]
    )


def test_unet_training_resumes_from_its_checkpoint(toy_model, tmp_path):
    from dataclasses import replace

    work, _ = toy_model
    longer = replace(TOY, unet_steps=TOY.unet_steps + 4)
    Trainer(longer, work).run(tmp_path / "resumed")
    report = json.loads((work / "reports.json").read_text())["unet"]
    assert report["steps"] == longer.unet_steps
    # Only the U-Net stage ran again; the cached stages were reused, not retrained.
    assert json.loads((tmp_path / "resumed" / "training.json").read_text())["session_seconds"] < 120


def test_quality_cli_writes_the_documented_json(toy_model, tmp_path):
    _, out = toy_model
    result_path = tmp_path / "quality.json"
    grid = tmp_path / "grid.png"
    run = run_conceptguard(
        "bench",
        "quality",
        "--model",
        str(out),
        "--cells",
        "ci",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--json",
        str(result_path),
        "--grid",
        str(grid),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(result_path.read_text())
    assert result["schema"] == "conceptguard.minicanvas.quality/2"
    assert set(result["base"]) >= {"style_acc", "object_acc", "synonym_acc", "implicit_acc"}
    assert set(result["gates"]) >= {"judge_style", "judge_object", "base_style", "all"}
    assert all(0.0 <= result["base"][k] <= 1.0 for k in ("style_acc", "object_acc"))
    assert result["config"]["seeds"] and result["config"]["sampler"] == "DDIMScheduler"
    assert grid.stat().st_size > 0
    assert "gates:" in run.stdout
