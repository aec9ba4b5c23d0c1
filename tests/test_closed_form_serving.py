"""UCE and ErasePro patches served per row: one worker's batch mixing tenants whose stacks
hold UCE, ErasePro (U-Net and text chains), HiRM and ESD patches equals each stack applied
offline with `Patch.apply`, in one denoiser call per step."""

from __future__ import annotations

import pytest
from served_batch import assert_served_as_offline, offline_image, serve_one_batch

from erasure.erasepro import EraseProConfig, erase_erasepro
from erasure.esd import EsdConfig, erase_esd
from erasure.hirm import HirmConfig, erase_hirm
from erasure.prompts import ConceptSpec
from erasure.uce import UceConfig, erase_uce

PROMPT = "a red cat"
CAT = ConceptSpec("cat", (), "dog")
TEMPLATES = ("a {concept}", "a red {concept}", "a photo of a {concept}")
RETAIN = ("a tree", "a blue car")


@pytest.fixture(scope="module")
def stacks(tiny_sd):
    uce = erase_uce(tiny_sd, UceConfig([CAT], templates=TEMPLATES, retain_prompts=RETAIN)).patch
    closed = dict(templates=TEMPLATES, retain_prompts=RETAIN)
    (ep_unet,) = erase_erasepro(tiny_sd, EraseProConfig([CAT], chain="unet", **closed)).patches
    (ep_text,) = erase_erasepro(tiny_sd, EraseProConfig([CAT], blocks=(0, 1), **closed)).patches
    hirm = erase_hirm(tiny_sd, HirmConfig([CAT], steps=10, lr=1e-3, progress=False)).patches[0]
    esd = erase_esd(
        tiny_sd, EsdConfig([CAT], steps=3, lr=3e-2, sample_steps=3, batch=2, progress=False)
    ).patch
    return {
        "uce": [uce],
        "ep-unet": [ep_unet],
        "ep-text": [ep_text],
        "hirm-uce": [hirm, uce],
        "ep-text-esd": [ep_text, esd],
        "esd-ep-unet-uce": [esd, ep_unet, uce],
        "none": [],
    }


def test_one_batch_mixing_closed_form_hirm_and_esd_tenants(
    tmp_path, tiny_sd, sd_model_path, stacks
):
    expected = {(t, 1): offline_image(tiny_sd, stack, PROMPT, 1) for t, stack in stacks.items()}
    assert len({image.tobytes() for image in expected.values()}) == len(stacks)
    answers = serve_one_batch(tmp_path, sd_model_path, stacks, PROMPT)
    assert_served_as_offline(answers, expected, stacks)
