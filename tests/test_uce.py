"""UCE: the closed-form edit of the denoiser's text key/value projections on SD, SDXL and
Flux, its patch (exact factors, stock diffusers loading) and the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import run_conceptguard
from served_batch import assert_stock_diffusers_matches

from erasure.cross_attention import MAX_RANK, kv_layers, lora_patch
from erasure.prompts import ConceptSpec
from erasure.token_pairs import align, token_pairs
from erasure.uce import UceConfig, erase_uce
from patches.lowrank import lora_as_lowrank
from patches.patch import Patch

CAT = [ConceptSpec("cat", ("kitty",), "dog")]
TEMPLATES = ("a {concept}", "a photo of a {concept} on the grass")
RETAIN = ("a tree", "a red car", "a house by the sea")


def test_token_alignment_pairs_the_concept_span_and_what_follows():
    # ids: [bos, a, plus, sign, in, dots, style, eos, pad, pad] vs [bos, a, pattern, in, ...]
    target = [0, 1, 20, 21, 3, 4, 5, 9, 9, 9]
    anchor = [0, 1, 30, 3, 4, 5, 9, 9, 9, 9]
    pairs = align(target, anchor, 8, 7, "all")
    assert pairs[:2] == [(2, 2), (3, 2)]  # both concept tokens -> the anchor's token
    assert pairs[2:] == [(4, 3), (5, 4), (6, 5), (7, 6), (8, 7), (9, 8)]
    assert align(target, anchor, 8, 7, "span") == [(2, 2), (3, 2)]
    assert align(target, anchor, 8, 7, "content")[-1] == (7, 6)  # through the end token
    # An empty anchor: the concept's tokens go to the token before the slot.
    assert align([0, 1, 20, 9], [0, 1, 9, 9], 3, 2, "span") == [(2, 1)]


def test_token_pairs_from_a_real_tokenizer(tiny_sd):
    pairs = token_pairs(tiny_sd.tokenizer, ["a cat on grass"], ["a dog on grass"], "all")
    length = tiny_sd.tokenizer.model_max_length
    _, t_pos, a_pos = pairs.index.unbind(1)
    assert int(t_pos.min()) >= 1 and int(t_pos.max()) == length - 1
    assert torch.equal(pairs.target_ids[0, t_pos[-4:]], pairs.anchor_ids[0, a_pos[-4:]])


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_uce_edits_every_key_value_projection(family, request):
    pipe = request.getfixturevalue(f"tiny_{family}")
    config = UceConfig(CAT, templates=TEMPLATES, retain_prompts=RETAIN, positions="content")
    result = erase_uce(pipe, config)
    patch = result.patch
    assert patch.manifest.kind == "unet_lora" and patch.manifest.method == "uce"
    assert {row["layer"] for row in result.layers} == set(kv_layers(pipe))
    suffixes = ("add_k_proj", "add_v_proj") if family == "flux" else ("to_k", "to_v")
    assert all(row["layer"].endswith(suffixes) for row in result.layers)
    for row in result.layers:
        # UCE is a compromise: its residual shrinks but does not vanish.
        assert 1e-3 < row["residual_after"] < row["residual_before"], row
        assert row["dropped"] == 0.0 and 0 < row["rank"] <= MAX_RANK
    patch.verify(pipe)


def test_factors_multiply_back_to_the_dense_edit_and_rank_is_capped(tiny_sd):
    layers = kv_layers(tiny_sd)
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for path in layers[:2]:
        w = tiny_sd.unet.get_submodule(path).weight
        u = torch.randn(w.shape[0], 3, generator=generator)
        deltas[path] = u @ torch.randn(3, w.shape[1], generator=generator)
    patch, ranks = lora_patch(
        tiny_sd, deltas, method="uce", concepts=["x"], params={}, name=None, eval=None
    )
    for path, delta in deltas.items():
        a = patch.tensors[f"unet.{path}.lora_A.weight"]
        b = patch.tensors[f"unet.{path}.lora_B.weight"]
        assert ranks[path] == {"rank": 3, "dropped": 0.0}
        torch.testing.assert_close(lora_as_lowrank(a, b).dense(), delta, rtol=1e-5, atol=1e-5)
    _, capped = lora_patch(
        tiny_sd, deltas, method="uce", concepts=["x"], params={}, name=None, eval=None, max_rank=2
    )
    assert all(v["rank"] == 2 and 0 < v["dropped"] < 1 for v in capped.values())


def test_the_patch_loads_in_stock_diffusers_with_the_same_image(tiny_sd, tmp_path):
    result = erase_uce(tiny_sd, UceConfig(CAT, templates=TEMPLATES, retain_prompts=RETAIN))
    path = tmp_path / "uce.safetensors"
    result.patch.save(path)
    assert_stock_diffusers_matches(tiny_sd, path, "a cat")


def test_cli_with_the_issues_flags(tmp_path, sd_model_path):
    retain = tmp_path / "keep.txt"
    retain.write_text("a tree\na red car\n")
    out = tmp_path / "cat.safetensors"
    proc = run_conceptguard(
        "erase",
        "uce",
        "--model",
        str(sd_model_path),
        "--concept",
        "cat",
        "--anchor",
        "dog",
        "--template",
        "a {concept}",
        "--preserve-prompts",
        str(retain),
        "--lambda",
        "0.5",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "UCE for cat" in proc.stdout and "retain prompts: " + str(retain) in proc.stdout
    params = Patch.load(out).manifest.params
    assert params["lam"] == 0.5 and params["retain_prompts"] == 2
