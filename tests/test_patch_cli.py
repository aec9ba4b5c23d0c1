"""`conceptguard patch inspect|verify` in real subprocesses."""

from __future__ import annotations

import json

from conftest import run_conceptguard, text_encoder_patch


def test_inspect_prints_manifest_and_tensors(tiny_sd, tmp_path):
    patch = text_encoder_patch(tiny_sd, seed=3)
    path = tmp_path / "p.safetensors"
    patch.save(path)

    result = run_conceptguard("patch", "inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["id"] == patch.id
    assert info["manifest"]["kind"] == "text_encoder"
    assert {t["name"] for t in info["tensors"]} == set(patch.tensors)

    human = run_conceptguard("patch", "inspect", str(path))
    assert human.returncode == 0
    assert patch.id in human.stdout and "text_encoder (override)" in human.stdout


def test_verify_accepts_the_right_model_and_refuses_another(tiny_sd, sd_model_path, tmp_path):
    from bench.tiny_pipelines import save_tiny_pipeline

    path = tmp_path / "p.safetensors"
    text_encoder_patch(tiny_sd, seed=4).save(path)
    ok = run_conceptguard("patch", "verify", str(path), "--model", str(sd_model_path), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True

    half = run_conceptguard(
        "patch", "verify", str(path), "--model", str(sd_model_path), "--dtype", "float16"
    )
    assert half.returncode == 0, half.stderr

    other = save_tiny_pipeline("sd", tmp_path / "other", seed=9)
    refused = run_conceptguard("patch", "verify", str(path), "--model", str(other))
    assert refused.returncode == 2
    assert "BaseFingerprintMismatch" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_missing_file_and_missing_model_are_one_line_refusals(tmp_path, tiny_sd):
    missing = run_conceptguard("patch", "inspect", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "No such file" in missing.stderr
    path = tmp_path / "p.safetensors"
    text_encoder_patch(tiny_sd, seed=5).save(path)
    no_model = run_conceptguard("patch", "verify", str(path), "--model", str(tmp_path / "no-model"))
    assert no_model.returncode == 2
    assert "not a local folder" in no_model.stderr
    assert "Traceback" not in no_model.stderr + missing.stderr
