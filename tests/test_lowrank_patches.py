"""`lowrank` weight patches (factor pairs in half precision) and `patch compress`: exact
when the edit is low-rank, refused when malformed, served per row like any weight patch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_conceptguard, text_encoder_patch
from served_batch import assert_served_as_offline, offline_image, serve_one_batch

from patches.compress import compress_patch
from patches.errors import BadTensorEntry, BaseFingerprintMismatch, InvalidManifest, ShapeMismatch
from patches.patch import Patch
from patches.targets import block_parameter_names

PROMPT = "a red circle"


def _low_rank_text_patch(pipe, rank: int = 2, seed: int = 3) -> Patch:
    """An override of block 0 whose matrices move by rank-`rank` products (biases too)."""
    params = dict(pipe.text_encoder.named_parameters())
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in block_parameter_names(pipe.text_encoder, [0]):
        weight = params[name].detach()
        if weight.dim() == 2:
            a = torch.randn(rank, weight.shape[1], generator=g)
            b = torch.randn(weight.shape[0], rank, generator=g)
            tensors[name] = weight + 0.05 * b @ a
        else:
            tensors[name] = weight + 0.05 * torch.randn(weight.shape, generator=g)
    return Patch.create(
        pipe=pipe,
        kind="text_encoder",
        component="text_encoder",
        method="test",
        concepts=["circle"],
        tensors=tensors,
    )


def _unet_low_rank_patch(pipe, rank: int = 2) -> Patch:
    """A dense delta of every cross-attention key projection, of rank `rank`."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2.to_k"):
            a = torch.randn(rank, module.in_features, generator=g)
            b = torch.randn(module.out_features, rank, generator=g)
            tensors[f"{name}.weight"] = 0.05 * b @ a
    return Patch.create(
        pipe=pipe,
        kind="unet_weights",
        component="unet",
        method="test-delta",
        concepts=["square"],
        tensors=tensors,
        mode="delta",
    )


def _weights_after(pipe, patch: Patch, component: str) -> dict[str, torch.Tensor]:
    patch.apply(pipe)
    try:
        module = getattr(pipe, component)
        return {n: p.detach().clone() for n, p in module.named_parameters()}
    finally:
        patch.remove(pipe)


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_compressing_a_low_rank_edit_is_exact(tiny_sd, component):
    original = (
        _low_rank_text_patch(tiny_sd)
        if component == "text_encoder"
        else _unet_low_rank_patch(tiny_sd)
    )
    compressed, report = compress_patch(original, tiny_sd, rank=4, dtype="float32")
    assert compressed.manifest.mode == "lowrank"
    assert compressed.manifest.params["compressed"]["from"] == original.id
    assert report.ranks and set(report.ranks.values()) == {4}
    assert report.max_error < 1e-5  # rank 2 edits, kept at rank 4: nothing lost
    assert report.bytes < report.source_bytes
    # The bytes round-trip through the untrusted-file reader.
    loaded = Patch.from_bytes(compressed.to_bytes())
    module = getattr(tiny_sd, component)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    want = _weights_after(tiny_sd, original, component)
    got = _weights_after(tiny_sd, loaded, component)
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    assert worst < 1e-5
    # The edits really moved the weights, and removal gives the base back exactly.
    after = {n: p.detach() for n, p in module.named_parameters()}
    assert any(not torch.equal(before[n], got[n]) for n in before)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert set(loaded.edit_shapes()) == set(original.edit_shapes())


def test_lossy_compression_reports_its_error_and_keeps_the_base_check(tiny_sd, other_sd):
    original = text_encoder_patch(tiny_sd, seed=4)  # seeded noise: full rank
    compressed, report = compress_patch(original, tiny_sd, rank=2, dtype="float16")
    assert all(t.dtype == torch.float16 for t in compressed.tensors.values())
    assert 0.3 < report.max_error < 1.0
    params = dict(tiny_sd.text_encoder.named_parameters())
    name = next(iter(report.errors))
    delta = original.tensors[name].float() - params[name].detach().float()
    kept = compressed.weight_edits()[name]
    measured = ((delta - kept).norm() / delta.norm()).item()
    assert abs(measured - report.errors[name]) < 1e-2  # float16 factors round a little
    with pytest.raises(BaseFingerprintMismatch):
        compressed.verify(other_sd)


def _raw_lowrank(pipe, tensors: dict[str, torch.Tensor]) -> Patch:
    return Patch.create(
        pipe=pipe,
        kind="text_encoder",
        component="text_encoder",
        method="test",
        concepts=["x"],
        tensors=tensors,
        mode="lowrank",
    )


def test_malformed_factors_are_refused(tiny_sd):
    name = block_parameter_names(tiny_sd.text_encoder, [0])[0]
    with pytest.raises(BadTensorEntry, match="pairs"):
        _raw_lowrank(tiny_sd, {f"{name}.lowrank_A": torch.zeros(1, 4)})
    with pytest.raises(BadTensorEntry, match="not factors"):
        _raw_lowrank(
            tiny_sd,
            {f"{name}.lowrank_A": torch.zeros(2, 4), f"{name}.lowrank_B": torch.zeros(4, 3)},
        )
    # Small factors of a huge product: refused before anything is multiplied.
    with pytest.raises(BadTensorEntry, match="2\\^27"):
        _raw_lowrank(
            tiny_sd,
            {
                f"{name}.lowrank_A": torch.zeros(1, 2**14),
                f"{name}.lowrank_B": torch.zeros(2**14, 1),
            },
        )
    matrix = next(
        n
        for n, p in tiny_sd.text_encoder.named_parameters()
        if n in block_parameter_names(tiny_sd.text_encoder, [0]) and p.dim() == 2
    )
    rows, cols = dict(tiny_sd.text_encoder.named_parameters())[matrix].shape
    wrong = _raw_lowrank(
        tiny_sd,
        {
            f"{matrix}.lowrank_A": torch.zeros(1, cols + 1),
            f"{matrix}.lowrank_B": torch.zeros(rows, 1),
        },
    )
    with pytest.raises(ShapeMismatch):
        wrong.verify(tiny_sd)
    with pytest.raises(InvalidManifest, match="lowrank"):
        Patch.create(
            pipe=tiny_sd,
            kind="unet_lora",
            component="unet",
            method="test",
            concepts=["x"],
            tensors={},
            mode="lowrank",
        )


def test_lowrank_patches_are_served_per_row_like_their_offline_apply(
    tmp_path, tiny_sd, sd_model_path
):
    text, _ = compress_patch(text_encoder_patch(tiny_sd, seed=6), tiny_sd, 3, "float16")
    unet, _ = compress_patch(_unet_low_rank_patch(tiny_sd), tiny_sd, 2, "float16")
    stacks = {"text": [text], "unet": [unet], "both": [text, unet], "none": []}
    expected = {(t, 1): offline_image(tiny_sd, stack, PROMPT, 1) for t, stack in stacks.items()}
    assert len({image.tobytes() for image in expected.values()}) == len(stacks)
    answers = serve_one_batch(tmp_path, sd_model_path, stacks, PROMPT)
    assert_served_as_offline(answers, expected, stacks)


def test_cli_compress_and_inspect(tmp_path, tiny_sd, sd_model_path):
    source = tmp_path / "p.safetensors"
    text_encoder_patch(tiny_sd, seed=7).save(source)
    out, report = tmp_path / "small.safetensors", tmp_path / "report.json"
    done = run_conceptguard(
        "patch", "compress", str(source), "--model", str(sd_model_path), "--rank", "2",
        "-o", str(out), "--json", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "largest relative error" in done.stdout
    data = json.loads(report.read_text())
    assert data["rank"] == 2 and data["bytes"] == out.stat().st_size
    shown = run_conceptguard("patch", "inspect", str(out))
    assert shown.returncode == 0 and "text_encoder (lowrank)" in shown.stdout
    assert "rank 2" in shown.stdout
    refused = run_conceptguard(
        "patch", "compress", str(source), "--model", str(sd_model_path), "--rank", "0",
        "-o", str(tmp_path / "never.safetensors"),
    )  # fmt: skip
    assert refused.returncode != 0 and "--rank must be >= 1" in refused.stderr
    assert not (tmp_path / "never.safetensors").exists()
