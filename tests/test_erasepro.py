"""ErasePro: the zero-residual solve, the progressive text chain, the U-Net / transformer end
point, the patches they make and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_conceptguard
from served_batch import assert_stock_diffusers_matches

from erasure.closed_form import Gram, uce, zero_residual
from erasure.cross_attention import kv_layers, solve_end_point, text_tokens
from erasure.erasepro import EraseProConfig, erase_erasepro
from erasure.prompts import ConceptSpec, PromptError
from patches.lowrank import factor_exactly, lora_as_lowrank
from patches.patch import Patch

CAT = [ConceptSpec("cat", ("kitty",), "dog")]
TEMPLATES = ("a {concept}", "a photo of a {concept} on the grass")
RETAIN = ("a tree", "a red car", "a house by the sea")


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(value.norm() / reference.norm())


def _random_chain(depth: int, width: int, tokens: int, seed: int = 0):
    """A residual chain x_{i+1} = x_i + tanh(W_i x_i): the stream carries what a layer's
    edit does not reach, as a transformer's does."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(width, width, generator=generator) / width**0.5 for _ in range(depth)]
    x = torch.randn(width, tokens, generator=generator)
    y = torch.randn(width, tokens, generator=generator)
    return weights, x, y


def test_zero_residual_on_every_layer_of_a_random_chain_and_uce_leaves_one():
    weights, x, y = _random_chain(depth=4, width=64, tokens=16)
    retain = Gram(64)
    retain.add(torch.randn(200, 64, generator=torch.Generator().manual_seed(1)))
    x_uce = x.clone()
    erasepro, by_uce = [], []
    for w0 in weights:
        target = w0 @ y
        solve = zero_residual(w0, x, target, retain, preserve_weight=1.0)
        edited = w0 + solve.delta  # float32, as a patch stores it
        erasepro.append(_relative(edited @ x - target, target))
        one_shot = uce(w0, x_uce, w0 @ y, retain)
        by_uce.append(_relative((w0 + one_shot.delta) @ x_uce - target, target))
        assert one_shot.residual_after == pytest.approx(by_uce[-1], rel=1e-3)
        # Progressive: the next layer's inputs come through the edited layer.
        x = x + torch.tanh(edited @ x)
        x_uce = x_uce + torch.tanh((w0 + one_shot.delta) @ x_uce)
        y = y + torch.tanh(target)
    assert max(erasepro) <= 1e-4, erasepro
    assert min(by_uce) > 1e-3 and all(u > e for u, e in zip(by_uce, erasepro, strict=True))


def test_more_tokens_than_width_impose_the_principal_combinations_exactly():
    weights, x, y = _random_chain(depth=1, width=16, tokens=64)
    w0 = weights[0]
    solve = zero_residual(w0, x, w0 @ y, rcond=0.6)
    assert solve.constraints < 16  # fewer combinations than tokens and than the width
    assert solve.residual_constrained <= 1e-6
    assert 0 < solve.residual_after < solve.residual_before
    # The edit's rank is the number of imposed constraints.
    assert factor_exactly(solve.delta).rank == solve.constraints


@pytest.fixture(scope="module")
def minicanvas():
    from patches.loading import load_pipeline
    from server.default_model import default_model_path

    return load_pipeline(str(default_model_path()), "float32")


def test_text_chain_on_minicanvas_changes_less_with_depth(minicanvas):
    circle = [ConceptSpec("circle", ("disc",), "pattern")]
    templates = ("a {concept} in stripes style", "{concept}, neon", "a {concept} in dots style")
    config = EraseProConfig(
        circle, templates=templates, retain_prompts=("a square in dots style", "a star, neon")
    )
    result = erase_erasepro(minicanvas, config)
    (patch,) = result.patches
    assert patch.manifest.kind == "text_encoder" and patch.manifest.mode == "delta"
    norms = [row["delta_norm"] for row in result.layers]
    assert [row["block"] for row in result.layers] == [0, 1, 2]
    assert norms[0] > norms[1] > norms[2] > 0, norms
    assert all(row["residual_constrained"] <= 1e-4 for row in result.layers)
    (readout,) = result.readouts
    assert readout["readout_gap_after"] < 0.5 * readout["readout_gap_before"]


def _states(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(
        prompt,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_chain_patch_moves_the_concept_to_its_anchor_and_removes_exactly(tiny_sd):
    config = EraseProConfig(CAT, templates=TEMPLATES, retain_prompts=RETAIN, blocks=(0, 1))
    before = {p: _states(tiny_sd, p) for p in ("a cat", "a dog", "a tree")}
    weights = {n: p.detach().clone() for n, p in tiny_sd.text_encoder.named_parameters()}
    (patch,) = erase_erasepro(tiny_sd, config).patches
    patch = Patch.from_bytes(patch.to_bytes())
    patch.apply(tiny_sd)
    try:
        cat = _states(tiny_sd, "a cat")
    finally:
        patch.remove(tiny_sd)
    assert _relative(cat - before["a dog"], before["a dog"]) < 0.5 * _relative(
        before["a cat"] - before["a dog"], before["a dog"]
    )
    for name, param in tiny_sd.text_encoder.named_parameters():
        assert torch.equal(param, weights[name])


def _dense_deltas(pipe, config: EraseProConfig) -> dict[str, torch.Tensor]:
    """The unet chain's dense edits, solved again as erase_erasepro solves them."""
    targets, anchors = config.prompt_pairs()

    def solve(w0, x, target, gram):
        return zero_residual(w0, x, target, gram, config.preserve_weight, config.rcond)

    pairs = config.token_pairs(*text_tokens(pipe))
    edit = solve_end_point(
        pipe, kv_layers(pipe), targets, anchors, pairs, config.retain(), solve, progressive=True
    )
    return edit.deltas


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_unet_chain_is_exact_low_rank_factors_per_layer(family, request):
    pipe = request.getfixturevalue(f"tiny_{family}")
    config = EraseProConfig(
        CAT, templates=TEMPLATES, retain_prompts=RETAIN, chain="unet", positions="span"
    )
    result = erase_erasepro(pipe, config)
    (patch,) = result.patches
    assert patch.manifest.kind == "unet_lora" and patch.manifest.method == "erasepro"
    deltas = _dense_deltas(pipe, config)
    component = patch.manifest.target.component
    denoiser = getattr(pipe, component)
    ranks = patch.manifest.params["ranks"]
    assert ranks and set(ranks) == {row["layer"] for row in result.layers}
    for row in result.layers:
        assert row["residual_constrained"] <= 1e-4, row
        a = patch.tensors[f"{component}.{row['layer']}.lora_A.weight"]
        b = patch.tensors[f"{component}.{row['layer']}.lora_B.weight"]
        assert a.shape[0] == ranks[row["layer"]] <= row["constraints"]
        # The factors' product is the solve's dense edit, to float tolerance.
        delta = deltas[row["layer"]]
        assert delta.shape == denoiser.get_submodule(row["layer"]).weight.shape
        dense = lora_as_lowrank(a, b).dense()
        torch.testing.assert_close(dense, delta, rtol=0, atol=1e-5 * float(delta.abs().max()))
    patch.verify(pipe)


def test_unet_chain_patch_loads_in_stock_diffusers_with_the_same_image(tiny_sd, tmp_path):
    config = EraseProConfig(CAT, templates=TEMPLATES, retain_prompts=RETAIN, chain="unet")
    (made,) = erase_erasepro(tiny_sd, config).patches
    path = tmp_path / "erasepro.safetensors"
    made.save(path)
    assert_stock_diffusers_matches(tiny_sd, path, "a cat")


def test_flux_chain_recaptures_inputs_through_edited_blocks(models_dir):
    from diffusers import FluxTransformer2DModel

    from bench.tiny_pipelines import tiny_pipeline

    pipe = tiny_pipeline("flux", models_dir, seed=0)
    torch.manual_seed(3)  # a second double-stream block, so block 1 reads block 0's output
    deep = FluxTransformer2DModel.from_config({**pipe.transformer.config, "num_layers": 2})
    pipe.transformer = deep.eval()
    config = EraseProConfig(
        CAT, templates=TEMPLATES, retain_prompts=RETAIN, chain="unet", positions="span"
    )
    layers = erase_erasepro(pipe, config).layers
    assert [r["layer"].split(".")[1] for r in layers] == ["0", "0", "1", "1"]
    assert all(r["residual_constrained"] <= 1e-4 for r in layers)


def test_every_concept_needs_an_anchor(tiny_sd):
    with pytest.raises(PromptError, match="--anchor"):
        erase_erasepro(tiny_sd, EraseProConfig([ConceptSpec("cat")], templates=TEMPLATES))


def test_cli_writes_a_patch_whose_inspect_shows_the_rank(tmp_path, sd_model_path):
    out, report = tmp_path / "cat.safetensors", tmp_path / "report.json"
    args = ["--model", str(sd_model_path), "--concept", "cat", "--anchor", "dog"]
    args += ["--template", "a {concept}", "--retain-prompts", "none", "--positions", "span"]
    proc = run_conceptguard(
        "erase", "erasepro", *args, "--chain", "unet", "-o", str(out), "--json", str(report)
    )
    assert proc.returncode == 0, proc.stderr
    assert "ErasePro (unet chain) for cat" in proc.stdout
    summary = json.loads(report.read_text())
    assert summary["layers"] and all(r["residual_constrained"] <= 1e-4 for r in summary["layers"])
    shown = run_conceptguard("patch", "inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "method            erasepro" in shown.stdout
    assert "rank" in shown.stdout
