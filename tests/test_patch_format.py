"""The patch file round-trips bit-exactly; apply/remove restores the base bit-exactly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import generate, lora_patch, text_encoder_patch

from patches.errors import BaseFingerprintMismatch, StackOrderError, WrongTarget
from patches.patch import Patch
from patches.targets import fingerprint, get_component


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} differs from the base"


def _unet_weights_patch(pipe) -> Patch:
    params = dict(pipe.unet.named_parameters())
    names = [n for n in params if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    generator = torch.Generator().manual_seed(7)
    tensors = {n: 0.05 * torch.randn(params[n].shape, generator=generator) for n in names}
    return Patch.create(
        pipe=pipe,
        kind="unet_weights",
        component="unet",
        method="uce",
        concepts=["circle"],
        tensors=tensors,
        mode="delta",
    )


PATCH_MAKERS = {
    "text_encoder-override": lambda p: text_encoder_patch(p, seed=1),
    "text_encoder-delta": lambda p: text_encoder_patch(p, seed=2, mode="delta"),
    "unet_weights-delta": _unet_weights_patch,
    "unet_lora": lambda p: lora_patch(p, seed=3),
}


@pytest.mark.parametrize("kind", PATCH_MAKERS)
def test_file_round_trip_is_bit_exact(kind, tiny_sd, tmp_path):
    patch = PATCH_MAKERS[kind](tiny_sd)
    path = tmp_path / "p.safetensors"
    patch_id = patch.save(path)
    data = path.read_bytes()
    assert patch_id == hashlib.sha256(data).hexdigest()

    loaded = Patch.load(path)
    assert loaded.manifest == patch.manifest
    assert set(loaded.tensors) == set(patch.tensors)
    for name, tensor in patch.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor)
    # Saving what was loaded gives the same bytes, so ids are stable.
    assert loaded.to_bytes() == data
    assert Patch.from_bytes(loaded.to_bytes()).id == patch_id


@pytest.mark.parametrize("kind", PATCH_MAKERS)
def test_apply_changes_output_and_remove_restores_base(kind, tiny_sd):
    patch = Patch.from_bytes(PATCH_MAKERS[kind](tiny_sd).to_bytes())
    module = get_component(tiny_sd, patch.manifest.target.component)
    before_state = _state(module)
    before_image = generate(tiny_sd)

    patch.apply(tiny_sd)
    patched_image = generate(tiny_sd)
    assert np.abs(patched_image - before_image).max() > 1e-4

    patch.remove(tiny_sd)
    _assert_same_state(module, before_state)
    assert np.array_equal(generate(tiny_sd), before_image)


def test_stack_is_last_in_first_out_and_restores_exactly(tiny_sd):
    first = text_encoder_patch(tiny_sd, seed=11)
    second = text_encoder_patch(tiny_sd, seed=12, mode="delta")
    before = _state(tiny_sd.text_encoder)
    first.apply(tiny_sd)
    second.apply(tiny_sd)
    with pytest.raises(StackOrderError, match="not the last one applied"):
        first.remove(tiny_sd)
    second.remove(tiny_sd)
    first.remove(tiny_sd)
    _assert_same_state(tiny_sd.text_encoder, before)


def test_second_patch_verifies_against_the_base_not_the_patched_state(tiny_sd):
    first, second = text_encoder_patch(tiny_sd, seed=21), text_encoder_patch(tiny_sd, seed=22)
    base_print = fingerprint(tiny_sd.text_encoder)
    first.apply(tiny_sd)
    try:
        assert fingerprint(tiny_sd.text_encoder) != base_print
        second.verify(tiny_sd)
    finally:
        first.remove(tiny_sd)
    assert fingerprint(tiny_sd.text_encoder) == base_print


def test_patch_for_one_base_is_refused_on_another(tiny_sd, other_sd):
    patch = text_encoder_patch(tiny_sd, seed=31)
    before = _state(other_sd.text_encoder)
    with pytest.raises(BaseFingerprintMismatch) as err:
        patch.apply(other_sd)
    message = str(err.value)
    assert patch.manifest.base_fingerprint["float32"][:12] in message
    assert fingerprint(other_sd.text_encoder, "float32")[:12] in message
    assert "exact model it was made for" in message
    _assert_same_state(other_sd.text_encoder, before)

    with pytest.raises(BaseFingerprintMismatch):
        lora_patch(tiny_sd, seed=32).verify(other_sd)


def test_float32_patch_verifies_on_half_precision_copy_of_same_base(tiny_sd, sd_model_path):
    from patches.loading import load_pipeline

    patch = text_encoder_patch(tiny_sd, seed=41)
    for dtype in ("float16", "bfloat16"):
        half = load_pipeline(sd_model_path, dtype)
        patch.verify(half)
        before = _state(half.text_encoder)
        patch.apply(half)
        patch.remove(half)
        _assert_same_state(half.text_encoder, before)


def test_sdxl_patches_each_encoder_and_the_unet(tiny_sdxl):
    for component in ("text_encoder", "text_encoder_2"):
        patch = text_encoder_patch(tiny_sdxl, seed=51, component=component)
        before, image = _state(getattr(tiny_sdxl, component)), generate(tiny_sdxl)
        patch.apply(tiny_sdxl)
        assert not np.array_equal(generate(tiny_sdxl), image)
        patch.remove(tiny_sdxl)
        _assert_same_state(getattr(tiny_sdxl, component), before)
        assert np.array_equal(generate(tiny_sdxl), image)
    lora = lora_patch(tiny_sdxl, seed=52)
    image = generate(tiny_sdxl)
    lora.apply(tiny_sdxl)
    lora.remove(tiny_sdxl)
    assert np.array_equal(generate(tiny_sdxl), image)


def test_flux_clip_and_transformer_lora(tiny_flux):
    image = generate(tiny_flux)
    for patch in (text_encoder_patch(tiny_flux, seed=61), lora_patch(tiny_flux, seed=62)):
        assert patch.manifest.target.family == "flux"
        patch.apply(tiny_flux)
        assert not np.array_equal(generate(tiny_flux), image)
        patch.remove(tiny_flux)
        assert np.array_equal(generate(tiny_flux), image)


def test_wrong_component_for_the_pipeline_is_refused(tiny_sd, tiny_sdxl):
    sdxl_patch = text_encoder_patch(tiny_sdxl, seed=71, component="text_encoder_2")
    with pytest.raises(WrongTarget, match="has only: text_encoder, unet"):
        sdxl_patch.verify(tiny_sd)
    flux_style = lora_patch(tiny_sd)
    assert flux_style.manifest.target.component == "unet"


def test_text_encoder_patch_transfers_to_a_pipeline_sharing_the_encoder(tiny_sd, tiny_flux):
    from diffusers import FluxPipeline

    shared = FluxPipeline(**{**tiny_flux.components, "text_encoder": tiny_sd.text_encoder})
    patch = text_encoder_patch(tiny_sd, seed=81)
    image = generate(shared)
    patch.apply(shared)
    assert not np.array_equal(generate(shared), image)
    patch.remove(shared)
    assert np.array_equal(generate(shared), image)


def test_fingerprint_cache_follows_in_place_edits(tiny_sd):
    encoder = tiny_sd.text_encoder
    original = fingerprint(encoder)
    param = next(encoder.parameters())
    with torch.no_grad():
        saved = param.detach().clone()
        param.add_(1.0)
    try:
        assert fingerprint(encoder) != original
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert fingerprint(encoder) == original


def test_lora_file_loads_with_diffusers_load_lora_weights(tiny_sd, tmp_path):
    patch = lora_patch(tiny_sd, seed=91)
    path = tmp_path / "lora.safetensors"
    patch.save(path)
    patch.apply(tiny_sd)
    ours = generate(tiny_sd)
    patch.remove(tiny_sd)
    tiny_sd.load_lora_weights(str(path), adapter_name="plain_diffusers")
    try:
        assert np.array_equal(generate(tiny_sd), ours)
    finally:
        tiny_sd.unload_lora_weights()  # unwraps peft's layers: the shared pipeline as it was
