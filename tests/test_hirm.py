"""HiRM on tiny real pipelines: what changes, what must not, files, CLI and transfer."""

from __future__ import annotations

import torch
from conftest import generate, run_conceptguard

from bench.tiny_pipelines import tiny_pipeline
from erasure.hirm import HirmConfig, erase_hirm
from erasure.prompts import ConceptSpec
from erasure.text_readout import read_states_batched, token_ids
from patches.patch import Patch

CAT = ConceptSpec("cat", ("kitty",), "animal")
UNRELATED = ("a red car", "a house on a hill", "a bowl of soup", "a blue boat at sea")


def _config(**overrides) -> HirmConfig:
    settings = dict(concepts=[CAT], retain_prompts=UNRELATED, progress=False, steps=80, lr=1e-3)
    settings.update(overrides)
    return HirmConfig(**settings)


def _states(pipe, prompts, component="text_encoder", tokenizer="tokenizer", layer="last"):
    ids = token_ids(getattr(pipe, tokenizer), list(prompts), "cpu")
    return read_states_batched(getattr(pipe, component), ids, layer)


def _relative(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean())


def test_only_the_configured_blocks_change(tiny_sd):
    before = {k: v.clone() for k, v in tiny_sd.text_encoder.state_dict().items()}
    patch = erase_hirm(tiny_sd, _config(blocks=(1,))).patches[0]
    assert patch.tensors and all(".layers.1." in name for name in patch.tensors)
    # Making a patch never touches the pipeline's own encoder.
    after = tiny_sd.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    patch.apply(tiny_sd)
    try:
        changed = {
            k for k, v in tiny_sd.text_encoder.state_dict().items() if not torch.equal(v, before[k])
        }
    finally:
        patch.remove(tiny_sd)
    assert changed and all(".layers.1." in k for k in changed)
    assert changed == set(patch.tensors)


def test_round_trip_through_the_file(tiny_sd, tmp_path):
    patch = erase_hirm(tiny_sd, _config()).patches[0]
    path = tmp_path / "cat.safetensors"
    patch_id = patch.save(path)
    loaded = Patch.load(path)
    assert loaded.id == patch_id
    assert loaded.manifest.method == "hirm" and loaded.manifest.concepts == ["cat"]
    assert loaded.manifest.params["variant"] == "S"
    assert loaded.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)
    loaded.verify(tiny_sd)


def test_target_moves_start_token_and_unrelated_prompts_stay(tiny_sd):
    result = erase_hirm(tiny_sd, _config())
    report = result.reports[0]
    targets = ("a photo of a cat", "a kitty in a scene")
    base_target, base_unrelated = _states(tiny_sd, targets), _states(tiny_sd, UNRELATED)
    base_empty = _states(tiny_sd, [""])
    result.patches[0].apply(tiny_sd)
    try:
        target, unrelated = _states(tiny_sd, targets), _states(tiny_sd, UNRELATED)
        empty = _states(tiny_sd, [""])
    finally:
        result.patches[0].remove(tiny_sd)
    moved = _relative(target[:, 1:], base_target[:, 1:])
    drift = _relative(unrelated, base_unrelated)
    # The served pipeline reproduces the drift the trainer measured and reported.
    assert abs(drift - report["retain_drift"]) < 1e-4
    assert moved > 5 * drift, (moved, drift)
    start_token = _relative(target[:, 0], base_target[:, 0])
    assert start_token <= 1e-2 and abs(start_token - report["start_token_drift"]) < 1e-4
    assert _relative(empty, base_empty) <= 1e-2
    assert report["target_gap_after"] < report["target_gap_before"]


def test_deterministic_for_a_seed(tiny_sd):
    first = erase_hirm(tiny_sd, _config(seed=3, variant="R")).patches[0]
    second = erase_hirm(tiny_sd, _config(seed=3, variant="R")).patches[0]
    other = erase_hirm(tiny_sd, _config(seed=4, variant="R")).patches[0]
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    assert not all(torch.equal(first.tensors[k], other.tensors[k]) for k in first.tensors)


def test_every_variant_and_several_concepts_in_one_patch(tiny_sd):
    dog = ConceptSpec("dog", (), "animal")
    for variant in ("R", "S", "V"):
        result = erase_hirm(tiny_sd, _config(concepts=[CAT, dog], variant=variant))
        (patch,) = result.patches
        assert patch.manifest.concepts == ["cat", "dog"]
        assert result.reports[0]["target_displacement"] > 0.05, variant
        assert result.reports[0]["prompts"] == 8 * 3  # templates x (cat, kitty, dog)


def test_sdxl_patches_both_encoders(tiny_sdxl):
    result = erase_hirm(tiny_sdxl, _config())
    assert [p.manifest.target.component for p in result.patches] == [
        "text_encoder",
        "text_encoder_2",
    ]
    assert {r["layer"] for r in result.reports} == {"penultimate"}
    before = [
        _states(tiny_sdxl, ["a cat"], "text_encoder", "tokenizer", "penultimate"),
        _states(tiny_sdxl, ["a cat"], "text_encoder_2", "tokenizer_2", "penultimate"),
    ]
    image = generate(tiny_sdxl, "a cat")
    for patch in result.patches:
        patch.apply(tiny_sdxl)
    try:
        after = [
            _states(tiny_sdxl, ["a cat"], "text_encoder", "tokenizer", "penultimate"),
            _states(tiny_sdxl, ["a cat"], "text_encoder_2", "tokenizer_2", "penultimate"),
        ]
        patched_image = generate(tiny_sdxl, "a cat")
    finally:
        for patch in reversed(result.patches):
            patch.remove(tiny_sdxl)
    assert all(_relative(a[:, 1:], b[:, 1:]) > 0.01 for a, b in zip(after, before, strict=True))
    assert not (patched_image == image).all()
    assert (generate(tiny_sdxl, "a cat") == image).all()


def test_a_patch_transfers_to_another_pipeline_with_the_same_encoder(tiny_sd, models_dir):
    flux = tiny_pipeline("flux", models_dir, seed=0)
    flux.text_encoder.load_state_dict(tiny_sd.text_encoder.state_dict())
    patch = erase_hirm(tiny_sd, _config()).patches[0]
    assert patch.manifest.target.family == "sd"
    base_states = _states(flux, ["a cat"])
    base_image = generate(flux, "a cat")
    patch.apply(flux)  # verifies the fingerprint: the same encoder, so it fits
    try:
        moved = _relative(_states(flux, ["a cat"])[:, 1:], base_states[:, 1:])
        image = generate(flux, "a cat")
    finally:
        patch.remove(flux)
    assert moved > 0.05
    assert not (image == base_image).all()
    assert (generate(flux, "a cat") == base_image).all()


def test_cli_writes_a_patch_and_reports(sd_model_path, tmp_path):
    out = tmp_path / "cat.safetensors"
    retain = tmp_path / "retain.txt"
    retain.write_text("# unrelated\n" + "\n".join(UNRELATED) + "\n")
    report = tmp_path / "report.json"
    proc = run_conceptguard(
        "erase", "hirm", "--model", str(sd_model_path), "--concept", "cat",
        "--synonyms", "kitty,kitten", "--anchor", "animal", "--retain-prompts", str(retain),
        "--steps", "10", "-o", str(out), "--json", str(report),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "peak memory" in proc.stdout and "retain drift" in proc.stdout
    patch = Patch.load(out)
    assert patch.manifest.params["synonyms"] == {"cat": ["kitty", "kitten"]}
    assert patch.manifest.params["retain_prompts"] == len(UNRELATED)
    import json

    summary = json.loads(report.read_text())
    assert summary["patches"][0]["id"] == patch.id
    assert summary["encoders"][0]["retain_drift_on"] == "retain prompts"


def test_cli_refuses_bad_settings_with_one_line(sd_model_path, tmp_path):
    out = tmp_path / "x.safetensors"
    two = ["--concept", "cat", "--concept", "dog", "--synonyms", "kitty", "--anchor", "a"]
    missing = ["--variant", "R", "--retain-prompts", str(tmp_path / "none.txt")]
    cases = [
        (["--concept", "cat"], "needs an anchor"),
        (two, "once per --concept"),
        (["--concept", "cat", "--anchor", "a", "--blocks", "7"], "block 7 does not exist"),
        (["--concept", "cat", "--anchor", "a", "--template", "no slot"], "{concept} slot"),
        (["--concept", "cat", *missing], "No such file"),
    ]
    for extra, message in cases:
        proc = run_conceptguard(
            "erase", "hirm", "--model", str(sd_model_path), "-o", str(out), *extra
        )
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()
