"""DuMo training: a unet_module patch whose eraser changes the concept's prompts, leaves
prompts its gate closes for exactly as they were, resumes where it stopped, and has a CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_conceptguard

from erasure.dumo import DumoConfig, erase_dumo
from erasure.prompts import ConceptSpec
from patches.errors import WrongTarget
from patches.patch import Patch

RETAIN = tuple(f"a {c} {o} on a table" for c in ("red", "blue", "green") for o in ("box", "cup"))


def _config(**changes) -> DumoConfig:
    settings = dict(
        concepts=[ConceptSpec("cat", ("kitten",), "animal")],
        templates=("a {concept}", "a photo of a {concept}", "a {concept} on a sofa"),
        retain_prompts=RETAIN,
        check_prompts=("a yellow ball", "a green tree"),
        width=0.5,
        buckets=4,
        steps=3,
        tlmo_steps=2,
        batch=2,
        sample_steps=3,
        resolution=32,  # 16x16 latents: the cost of a step is the tiny U-Net's attention
        progress=False,
    )
    return DumoConfig(**{**settings, **changes})


def _image(pipe, prompt: str, patch: Patch | None = None) -> np.ndarray:
    if patch is not None:
        patch.apply(pipe)
    try:
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt,
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(1),
            output_type="np",
        ).images[0]
    finally:
        if patch is not None:
            patch.remove(pipe)


@pytest.fixture(scope="module")
def result(tiny_sd):
    return erase_dumo(tiny_sd, _config(steps=4, lr=1e-2))


def test_a_dumo_patch_erases_where_its_gate_opens_only(tiny_sd, result):
    patch = Patch.from_bytes(result.patch.to_bytes())
    assert patch.manifest.kind == "unet_module" and patch.manifest.method == "dumo"
    assert patch.manifest.params["module_type"] == "dumo_epr"
    patch.verify(tiny_sd)
    gate = result.report["gate"]
    assert gate["gate"] == "on" and gate["high"] > gate["low"]
    assert result.report["eraser"]["steps"] == 4 and len(result.report["tlmo"]["table"]) == 4
    concept = "a photo of a cat"
    assert np.abs(_image(tiny_sd, concept, patch) - _image(tiny_sd, concept)).max() > 1e-3
    # A prompt below the gate's range: the eraser adds exact zeros, the image is the base's.
    other = "a blue box on a table"
    assert np.array_equal(_image(tiny_sd, other, patch), _image(tiny_sd, other))
    assert result.report["check_eps_drift"] < result.report["concept_eps_shift"]


def test_the_gate_contrast_covers_the_padding_states_it_reads(tiny_sd, result):
    """The gate scores every position of a prompt, padding included (a padding state sums
    up the prompt); the contrast must hold other prompts' padding states too, or an unseen
    prompt can open the gate through its padding (MiniCanvas: "a plain cross" on dots)."""
    contrast = result.patch.tensors["module.gate_contrast"]
    tokens = tiny_sd.tokenizer(RETAIN[0], padding="max_length", return_tensors="pt").input_ids
    length = len(tiny_sd.tokenizer(RETAIN[0]).input_ids)
    with torch.no_grad():
        states = tiny_sd.text_encoder(tokens)[0][0]
    assert length < len(states)  # the first retain prompt has padding
    distance = torch.cdist(states[length:], contrast).min(dim=1).values
    assert distance.min() < 1e-4  # its padding is in the contrast
    assert len(contrast) > len(RETAIN) * (length - 1)  # more than the prompts' tokens


def test_training_resumes_where_it_stopped(tiny_sd, tmp_path):
    straight = erase_dumo(tiny_sd, _config(steps=4, tlmo_steps=2)).patch.tensors
    checkpoint = tmp_path / "run"
    erase_dumo(tiny_sd, _config(steps=2, tlmo_steps=0, checkpoint=checkpoint, checkpoint_every=2))
    assert json.loads(checkpoint.with_suffix(".json").read_text())["step"] == 2
    resumed = erase_dumo(
        tiny_sd, _config(steps=4, tlmo_steps=2, checkpoint=checkpoint, checkpoint_every=2)
    ).patch.tensors
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_tlmo_learns_every_timestep_bucket_and_resumes_inside_its_cycle(tiny_sd, tmp_path):
    """A TLMO row learns only from the steps drawn in its bucket. Drawn at random, 60 steps
    out of 25 left bucket 13 (t = 679) at its initial 1.0 in all 16 MiniCanvas patches;
    here 6 random draws over 4 steps left bucket 0 at 1.0."""
    config = dict(steps=2, lr=1e-2, sample_steps=4, buckets=4)  # t = 751, 501, 251, 1
    straight = erase_dumo(tiny_sd, _config(**config, tlmo_steps=6))
    table = torch.tensor(straight.report["tlmo"]["table"])
    assert (table != 1.0).any(dim=1).all(), table
    checkpoint = tmp_path / "run"
    stopped = _config(**config, tlmo_steps=3, checkpoint=checkpoint, checkpoint_every=3)
    erase_dumo(tiny_sd, stopped)  # stops inside TLMO's first cycle; the resumed run ends it
    resumed = _config(**config, tlmo_steps=6, checkpoint=checkpoint, checkpoint_every=3)
    tensors = erase_dumo(tiny_sd, resumed).patch.tensors
    for name, tensor in straight.patch.tensors.items():
        assert torch.equal(tensor, tensors[name]), name


def test_anchor_share_draws_states_from_the_anchored_trajectory(tiny_sd):
    plain = erase_dumo(tiny_sd, _config(steps=2, tlmo_steps=0, anchor_share=0.0)).patch
    anchored = erase_dumo(tiny_sd, _config(steps=2, tlmo_steps=0, anchor_share=1.0)).patch
    assert anchored.manifest.params["anchor_share"] == 1.0
    # Same seed, same prompts picked: only where x_t came from differs, and so does the eraser.
    differs = [n for n, t in plain.tensors.items() if not torch.equal(t, anchored.tensors[n])]
    assert any(n.startswith("module.skip_outs") for n in differs)
    with pytest.raises(Exception, match="anchor share"):
        erase_dumo(tiny_sd, _config(anchor_share=1.5))


def test_flux_and_missing_anchors_are_refused(tiny_flux, tiny_sd):
    with pytest.raises(WrongTarget, match="skip connections"):
        erase_dumo(tiny_flux, _config())
    with pytest.raises(Exception, match="anchor"):
        erase_dumo(tiny_sd, _config(concepts=[ConceptSpec("cat")]))


def test_cli_writes_the_patch_and_its_report(sd_model_path, tmp_path):
    out, report = tmp_path / "cat.safetensors", tmp_path / "cat.json"
    done = run_conceptguard(
        "erase", "dumo", "--model", str(sd_model_path), "--concept", "cat", "--anchor", "animal",
        "--width", "0.5", "--steps", "2", "--tlmo-steps", "1", "--batch", "2",
        "--sample-steps", "3", "--buckets", "4", "--resolution", "32",
        "-o", str(out), "--json", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "DuMo for cat" in done.stdout and "prompt gate" in done.stdout
    params = Patch.load(out).manifest.params
    assert params["module_config"]["width"] == 0.5
    assert params["anchor_share"] == 0.5  # the default the sweep measured, without the flag
    assert json.loads(report.read_text())["method"] == "dumo"
    refused = run_conceptguard(
        "erase", "dumo", "--model", str(sd_model_path), "--concept", "cat", "-o", str(out)
    )
    assert refused.returncode == 2 and "anchor" in refused.stderr + refused.stdout
