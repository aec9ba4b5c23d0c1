"""ESD as a U-Net LoRA on tiny real pipelines: which modules, the stock LoRA format, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate, run_conceptguard

from erasure.esd import EsdConfig, erase_esd
from erasure.prompts import ConceptSpec
from patches.patch import Patch

QUICK = dict(steps=3, sample_steps=4, batch=2, progress=False)


def _esd(pipe, **overrides):
    return erase_esd(pipe, EsdConfig([ConceptSpec("cat", ("kitty",))], **{**QUICK, **overrides}))


def _base_and_patched(pipe, patch: Patch, prompt: str = "a cat"):
    """`prompt`'s image without and with `patch` (removed again afterwards)."""
    base = generate(pipe, prompt)
    patch.apply(pipe)
    try:
        return base, generate(pipe, prompt)
    finally:
        patch.remove(pipe)


@pytest.mark.parametrize("mode", ["x", "u"])
def test_mode_picks_the_adapted_modules(tiny_sd, mode):
    result = _esd(tiny_sd, mode=mode)
    names = list(result.patch.tensors)
    assert names and all(n.startswith("unet.") for n in names)
    cross = [n for n in names if ".attn2." in n]
    assert (cross == names) if mode == "x" else not cross
    assert result.patch.manifest.kind == "unet_lora"
    assert result.patch.manifest.method == f"esd-{mode}"
    assert result.report["adapted_modules"] * 2 == len(names)


def test_the_file_is_a_stock_diffusers_lora(tiny_sd, tmp_path):
    patch = _esd(tiny_sd, steps=6, lr=1e-2).patch
    path = tmp_path / "esd.safetensors"
    patch.save(path)
    base, ours = _base_and_patched(tiny_sd, Patch.load(path))
    assert not np.array_equal(ours, base)
    np.testing.assert_array_equal(generate(tiny_sd, "a cat"), base)
    tiny_sd.load_lora_weights(str(path), adapter_name="stock")
    try:
        stock = generate(tiny_sd, "a cat")
    finally:
        tiny_sd.unload_lora_weights()
    np.testing.assert_allclose(stock, ours, atol=1e-6)


def test_deterministic_for_a_seed_and_leaves_the_pipeline_alone(tiny_sd):
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    first, second = _esd(tiny_sd, seed=5).patch, _esd(tiny_sd, seed=5).patch
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    after = tiny_sd.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_retain_term_keeps_unrelated_predictions(tiny_sd):
    retain = ("a dog", "a red house", "a tree in winter")
    # The whole trajectory: with 4 sampling steps, the default first 60% is x_t from pure
    # noise or one step after it, too few distinct draws for 6 steps to tell the terms apart.
    settings = dict(steps=6, lr=3e-2, retain_prompts=retain, t_range=(0.0, 1.0))
    plain = _esd(tiny_sd, **settings, retain_weight=0.0)
    kept = _esd(tiny_sd, **settings, retain_weight=100.0)
    # Same seed, same x_t and prompt draws: only the weight of the term differs.
    assert kept.report["retain_set_eps_drift"] < 0.5 * plain.report["retain_set_eps_drift"]
    assert kept.report["concept_eps_shift"] > 0
    params = kept.patch.manifest.params
    assert params["retain_prompts"] == 3 and params["retain_weight"] == 100.0
    assert _esd(tiny_sd).patch.manifest.params["retain_weight"] is None


def test_sdxl_u_net_with_its_added_conditioning(tiny_sdxl):
    result = _esd(tiny_sdxl, steps=4, lr=1e-2)
    assert all(".attn2." in n for n in result.patch.tensors)
    base, patched = _base_and_patched(tiny_sdxl, result.patch)
    assert not np.array_equal(base, patched)
    assert result.report["concept_eps_shift"] > 0


def test_flux_transformer_lora(tiny_flux, tmp_path):
    result = _esd(tiny_flux, steps=3, lr=1e-2, resolution=64)
    names = list(result.patch.tensors)
    assert names and all(n.startswith("transformer.") and ".attn." in n for n in names)
    assert result.patch.manifest.target.component == "transformer"
    base, patched = _base_and_patched(tiny_flux, result.patch)
    assert not np.array_equal(base, patched)
    np.testing.assert_array_equal(generate(tiny_flux, "a cat"), base)


def test_cli_writes_a_patch_and_refuses_bad_settings(sd_model_path, tmp_path):
    out = tmp_path / "cat.safetensors"
    common = ["erase", "esd", "--model", str(sd_model_path), "--concept", "cat", "-o", str(out)]
    proc = run_conceptguard(*common, "--steps", "2", "--sample-steps", "3", "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    assert "ESD-x for cat" in proc.stdout and "peak memory" in proc.stdout
    assert Patch.load(out).manifest.params["rank"] == 4
    out.unlink()
    for extra, message in (
        (["--timesteps", "0.9,0.1"], "timestep range"),
        (["--timesteps", "abc"], "two fractions"),
        (["--rank", "0"], "rank, steps and batch"),
        (["--retain-weight", "-1"], "retain weight"),
        (["--retain-prompts", str(tmp_path / "missing.txt")], "missing.txt"),
    ):
        proc = run_conceptguard(*common, *extra)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()
