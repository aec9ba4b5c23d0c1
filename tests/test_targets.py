"""Pipeline targets: families, components, block lists by suffix, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate

from bench.tiny_pipelines import save_tiny_pipeline, tiny_pipeline
from patches.errors import WrongTarget
from patches.loading import load_pipeline
from patches.targets import (
    block_parameter_names,
    find_block_list,
    fingerprint,
    fingerprints_by_dtype,
    get_component,
    pipeline_components,
    pipeline_family,
)

EXPECTED = {
    "sd": ("StableDiffusionPipeline", ["text_encoder", "unet"]),
    "sdxl": ("StableDiffusionXLPipeline", ["text_encoder", "text_encoder_2", "unet"]),
    "flux": ("FluxPipeline", ["text_encoder", "text_encoder_2", "transformer"]),
}


@pytest.mark.parametrize("family", EXPECTED)
def test_tiny_pipelines_load_back_and_generate_deterministically(family, models_dir):
    pipe = tiny_pipeline(family, models_dir)
    class_name, components = EXPECTED[family]
    assert type(pipe).__name__ == class_name
    assert pipeline_family(pipe) == family
    assert sorted(pipeline_components(pipe)) == components
    first, second = generate(pipe, seed=4), generate(pipe, seed=4)
    assert first.shape == (1, 64, 64, 3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, generate(pipe, seed=5))


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_sd, other_sd):
    again = load_pipeline(save_tiny_pipeline("sd", tmp_path / "again", seed=0))
    assert fingerprint(again.text_encoder) == fingerprint(tiny_sd.text_encoder)
    assert fingerprint(again.unet) == fingerprint(tiny_sd.unet)
    assert fingerprint(other_sd.text_encoder) != fingerprint(tiny_sd.text_encoder)


def test_block_lists_are_found_by_suffix_whatever_the_prefix(tiny_sdxl, tiny_flux):
    # CLIPTextModel has no `text_model.` prefix in transformers 5.x;
    # CLIPTextModelWithProjection keeps it; T5 calls its blocks `encoder.block`.
    names = {
        "clip": find_block_list(tiny_sdxl.text_encoder)[0],
        "clip-with-projection": find_block_list(tiny_sdxl.text_encoder_2)[0],
        "t5": find_block_list(tiny_flux.text_encoder_2)[0],
    }
    assert all(n.endswith(("encoder.layers", "encoder.block")) for n in names.values())
    assert len({*names.values()}) == 3
    for encoder in (tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2, tiny_flux.text_encoder_2):
        block0 = block_parameter_names(encoder, [0])
        assert block0 and all(".0." in n for n in block0)
        assert not set(block0) & set(block_parameter_names(encoder, [1]))


def test_block_index_out_of_range_is_refused(tiny_sd):
    with pytest.raises(WrongTarget, match=r"has 2 blocks \(0..1\)"):
        block_parameter_names(tiny_sd.text_encoder, [5])


def test_missing_component_is_named(tiny_sd):
    with pytest.raises(WrongTarget, match="has only: text_encoder, unet"):
        get_component(tiny_sd, "transformer")


def test_fingerprints_by_dtype_match_a_cast_copy(tiny_sd, sd_model_path):
    prints = fingerprints_by_dtype(tiny_sd.text_encoder)
    assert set(prints) == {"float32", "float16", "bfloat16"}
    half = load_pipeline(sd_model_path, "float16")
    assert fingerprint(half.text_encoder) == prints["float16"]
    assert fingerprint(half.text_encoder, "float16") == prints["float16"]


def test_fingerprint_ignores_lora_wrappers(tiny_sd):
    from conftest import lora_patch

    before = fingerprint(tiny_sd.unet)
    patch = lora_patch(tiny_sd, seed=1)
    patch.apply(tiny_sd)
    try:
        assert any("base_layer" in n for n, _ in tiny_sd.unet.named_parameters())
        assert fingerprint(tiny_sd.unet) == before
    finally:
        patch.remove(tiny_sd)
    assert not any("base_layer" in n for n, _ in tiny_sd.unet.named_parameters())


def test_fingerprint_covers_every_parameter(tiny_sd):
    encoder = tiny_sd.text_encoder
    before = fingerprint(encoder)
    last = list(encoder.parameters())[-1]
    with torch.no_grad():
        saved = last.detach().clone()
        last.view(-1)[0] += 1e-3
        changed = fingerprint(encoder)
        last.copy_(saved)
    assert changed != before
    assert fingerprint(encoder) == before
