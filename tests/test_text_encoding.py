"""Multi-tenant text encoding against the reference: Patch.apply, then the stock encoder."""

from __future__ import annotations

import pytest
import torch
from conftest import text_encoder_patch

from patches.patch import Patch
from patches.stacks import compose_weight_stack
from patches.targets import block_parameter_names
from server.text_encoding import build_text_plan, prompt_encoder_for, routed

PROMPTS = ["a red circle", "a blue square", "", "a red circle", "", "green"]


@pytest.fixture(scope="module")
def stacks(tiny_sd):
    a = text_encoder_patch(tiny_sd, seed=1)
    b = text_encoder_patch(tiny_sd, seed=2, mode="delta")
    return {"base": [], "a": [a], "b": [b], "ab": [a, b], "ba": [b, a]}


def _plan(pipe, stack: list[Patch]):
    if not stack:
        return None
    for patch in stack:
        patch.verify(pipe)
    return build_text_plan(pipe, compose_weight_stack(pipe, stack))


def _reference(pipe, stack: list[Patch], texts: list[str]) -> torch.Tensor:
    for patch in stack:
        patch.apply(pipe)
    try:
        embeds, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    finally:
        for patch in reversed(stack):
            patch.remove(pipe)
    return embeds


def test_mixed_batch_matches_patch_apply_per_tenant(tiny_sd, stacks):
    tenants = ["a", "base", "a", "b", "ab", "ba"]
    plans = {name: _plan(tiny_sd, stack) for name, stack in stacks.items()}
    encoded = prompt_encoder_for(tiny_sd).encode(PROMPTS, [plans[t] for t in tenants])
    worst = 0.0
    for row, (text, tenant) in enumerate(zip(PROMPTS, tenants, strict=True)):
        expected = _reference(tiny_sd, stacks[tenant], [text])[0]
        worst = max(worst, (encoded["prompt_embeds"][row] - expected).abs().max().item())
    # Rows of one group are computed on a subset of the batch; CPU kernels may round a
    # subset differently (measured: <= 1.2e-7 on the tiny CLIP).
    assert worst <= 1e-6
    # And the patches really act: tenant rows differ from the base encoding.
    base = _reference(tiny_sd, [], ["a red circle"])[0]
    assert (encoded["prompt_embeds"][0] - base).abs().max() > 1e-3


def test_single_group_batch_is_bit_identical(tiny_sd, stacks):
    texts = ["a red circle", "green", ""]
    plan = _plan(tiny_sd, stacks["ab"])
    encoded = prompt_encoder_for(tiny_sd).encode(texts, [plan] * len(texts))
    assert torch.equal(encoded["prompt_embeds"], _reference(tiny_sd, stacks["ab"], texts))


def test_empty_negative_prompt_goes_through_the_tenant_encoder(tiny_sd, stacks):
    plan = _plan(tiny_sd, stacks["a"])
    encoded = prompt_encoder_for(tiny_sd).encode(["", ""], [plan, None])["prompt_embeds"]
    assert torch.equal(encoded[0], _reference(tiny_sd, stacks["a"], [""])[0])
    assert torch.equal(encoded[1], _reference(tiny_sd, [], [""])[0])
    assert not torch.equal(encoded[0], encoded[1])


def test_stack_composition_equals_sequential_apply(tiny_sd, stacks):
    # Both patches edit every tensor of block 0: override then delta, and delta then override.
    for name in ("ab", "ba"):
        composed = compose_weight_stack(tiny_sd, stacks[name])["text_encoder"]
        assert len(composed.overlaps) == len(stacks["a"][0].tensors)
        for patch in stacks[name]:
            patch.apply(tiny_sd)
        try:
            params = dict(tiny_sd.text_encoder.named_parameters())
            assert all(torch.equal(params[n], t) for n, t in composed.tensors.items())
        finally:
            for patch in reversed(stacks[name]):
                patch.remove(tiny_sd)


def test_plan_holds_only_the_edited_block(tiny_sd, stacks):
    plan = _plan(tiny_sd, stacks["a"])
    assert list(plan.stages["text_encoder"]) == ["encoder.layers.0"]
    block_bytes = sum(
        p.numel() * p.element_size()
        for n, p in tiny_sd.text_encoder.named_parameters()
        if n in block_parameter_names(tiny_sd.text_encoder, [0])
    )
    assert plan.nbytes == block_bytes
    clone = plan.stages["text_encoder"]["encoder.layers.0"]
    base = tiny_sd.text_encoder.encoder.layers[0]
    assert clone is not base
    # A patch that edits only some tensors of a block shares the others with the base.
    partial = Patch.create(
        pipe=tiny_sd,
        kind="text_encoder",
        component="text_encoder",
        method="test",
        concepts=["x"],
        tensors={"encoder.layers.1.mlp.fc1.bias": torch.zeros(37)},
    )
    partial_plan = _plan(tiny_sd, [partial])
    clone = partial_plan.stages["text_encoder"]["encoder.layers.1"]
    shared = tiny_sd.text_encoder.encoder.layers[1]
    assert clone.mlp.fc2.weight is shared.mlp.fc2.weight
    assert clone.mlp.fc1.bias is not shared.mlp.fc1.bias
    assert partial_plan.nbytes == 37 * 4


def test_encoder_is_restored_when_the_forward_raises(tiny_sd, stacks):
    encoder = tiny_sd.text_encoder
    before = list(encoder.encoder.layers)
    plans = [_plan(tiny_sd, stacks["a"]), None]
    with pytest.raises(RuntimeError, match="boom"), routed(encoder, "text_encoder", plans):
        assert encoder.encoder.layers[0] is not before[0]
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(encoder.encoder.layers, before, strict=True))


def _family_stacks(pipe, components):
    return {
        "base": [],
        "one": [text_encoder_patch(pipe, seed=3, component=components[0])],
        "both": [text_encoder_patch(pipe, seed=4, component=c) for c in components],
    }


def _mixed(pipe, stacks, reference):
    tenants = ["one", "base", "both", "one", "both", "base"]
    plans = {name: _plan(pipe, stack) for name, stack in stacks.items()}
    encoded = prompt_encoder_for(pipe).encode(PROMPTS, [plans[t] for t in tenants])
    for row, (text, tenant) in enumerate(zip(PROMPTS, tenants, strict=True)):
        for patch in stacks[tenant]:
            patch.apply(pipe)
        try:
            expected = reference(text)
        finally:
            for patch in reversed(stacks[tenant]):
                patch.remove(pipe)
        for key, value in expected.items():
            # Subset rounding (see above) grows with depth: T5's 512-token states reach ~8e-6.
            scale = max(1.0, value.abs().max().item())
            error = (encoded[key][row] - value[0].detach()).abs().max().item()
            assert error <= 1e-5 * scale, (key, tenant, error)
    assert (encoded["prompt_embeds"][0] - encoded["prompt_embeds"][1]).abs().max() > 1e-4


def test_sdxl_rows_match_patch_apply_on_both_encoders(tiny_sdxl):
    def reference(text):
        embeds, _, pooled, _ = tiny_sdxl.encode_prompt(
            text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    stacks = _family_stacks(tiny_sdxl, ["text_encoder", "text_encoder_2"])
    _mixed(tiny_sdxl, stacks, reference)


def test_flux_rows_match_patch_apply_on_clip_and_t5(tiny_flux):
    def reference(text):
        embeds, pooled, _ = tiny_flux.encode_prompt(text, None, max_sequence_length=512)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    stacks = _family_stacks(tiny_flux, ["text_encoder", "text_encoder_2"])
    _mixed(tiny_flux, stacks, reference)
