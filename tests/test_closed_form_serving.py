"""UCE and ErasePro patches served per row: one worker's batch mixing tenants whose stacks
hold UCE, ErasePro (U-Net and text chains), HiRM and ESD patches equals each stack applied
offline with `Patch.apply`, in one denoiser call per step."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from erasure.erasepro import EraseProConfig, erase_erasepro
from erasure.esd import EsdConfig, erase_esd
from erasure.hirm import HirmConfig, erase_hirm
from erasure.prompts import ConceptSpec
from erasure.uce import UceConfig, erase_uce
from patches.registry import open_registry
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.schemas import ImageGenerationRequest, WorkItem

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


def _offline(pipe, stack, seed: int) -> np.ndarray:
    for patch in stack:
        patch.apply(pipe)
    try:
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            PROMPT,
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
    finally:
        for patch in reversed(stack):
            patch.remove(pipe)
    return np.asarray(image).astype(int)


def test_one_batch_mixing_closed_form_hirm_and_esd_tenants(
    tmp_path, tiny_sd, sd_model_path, stacks
):
    expected = {t: _offline(tiny_sd, stack, 1) for t, stack in stacks.items()}
    assert len({image.tobytes() for image in expected.values()}) == len(stacks)
    registry = open_registry(tmp_path / "registry")
    for tenant, stack in stacks.items():
        registry.set_tenant(tenant, [registry.put_patch(p.to_bytes()).id for p in stack])
    threads = torch.get_num_threads()
    worker = GenerationAPI(
        ModelSettings(str(sd_model_path)), ServerConfig(), str(tmp_path / "registry")
    )
    worker.setup("cpu")
    try:
        items = [
            WorkItem(t, t, ImageGenerationRequest(prompt=PROMPT, seed=1, steps=3), 1, time.time())
            for t in stacks
        ]
        answers = worker.predict(items)
        for item, answer in zip(items, answers, strict=True):
            assert answer["status"] == 200, answer
            got = np.asarray(answer["images"][0]).astype(int)
            assert np.abs(got - expected[item.tenant]).max() <= 1, item.tenant
            assert answer["record"].patches == [p.id for p in stacks[item.tenant]]
        assert {a["record"].denoiser_calls for a in answers} == {3}
    finally:
        torch.set_num_threads(threads)
