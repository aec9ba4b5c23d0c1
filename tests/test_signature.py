"""ModelSignature: the verdicts of Patch.verify without the model's weights."""

from __future__ import annotations

import pickle

import pytest
from conftest import lora_patch, text_encoder_patch, unet_weights_patch

from patches.errors import BaseFingerprintMismatch, WrongTarget
from patches.signature import ModelSignature


def test_same_verdicts_as_the_pipeline(tiny_sd, other_sd, tiny_flux):
    signature = ModelSignature.of(tiny_sd)
    for patch in (text_encoder_patch(tiny_sd), lora_patch(tiny_sd), unet_weights_patch(tiny_sd)):
        patch.verify(signature)
        patch.verify(tiny_sd)
    for patch in (text_encoder_patch(other_sd), lora_patch(other_sd)):
        for target in (signature, tiny_sd):
            with pytest.raises(BaseFingerprintMismatch):
                patch.verify(target)
    flux_lora = lora_patch(tiny_flux)  # targets the transformer, which SD has not
    with pytest.raises(WrongTarget, match="has only: text_encoder, unet"):
        flux_lora.verify(signature)


def test_a_patched_pipeline_has_its_base_signature(tiny_sd):
    before = ModelSignature.of(tiny_sd)
    patches = [text_encoder_patch(tiny_sd, seed=5), lora_patch(tiny_sd, seed=5)]
    for patch in patches:
        patch.apply(tiny_sd)
    try:
        during = ModelSignature.of(tiny_sd)
    finally:
        for patch in reversed(patches):
            patch.remove(tiny_sd)
    assert during == before


def test_it_is_small(tiny_sdxl):
    # Names, shapes and hashes: what the API process keeps instead of a model copy.
    assert len(pickle.dumps(ModelSignature.of(tiny_sdxl))) < 100_000
