"""Tenant stacks of every kind: HiRM only (a), ESD only (b), HiRM + ESD + DuMo (c), none (d).

In one worker's batch and through a real 2-worker server under concurrent traffic, every
image equals what that tenant's stack gives offline (Patch.apply on a plain pipeline, same
seed): no cross-talk between tenants whose rows share a worker or a batch.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from tenant_server import images_of, start_tenant_server

from erasure.dumo import DumoConfig, erase_dumo
from erasure.esd import EsdConfig, erase_esd
from erasure.hirm import HirmConfig, erase_hirm
from erasure.prompts import ConceptSpec
from patches.registry import open_registry
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.schemas import ImageGenerationRequest, WorkItem

PROMPT = "a red cat"
TENANTS = "abcd"


@pytest.fixture(scope="module")
def patches(tiny_sd):
    cat = ConceptSpec("cat", (), "animal")
    hirm = erase_hirm(tiny_sd, HirmConfig([cat], steps=20, lr=1e-3, progress=False)).patches[0]
    esd = erase_esd(
        tiny_sd, EsdConfig([cat], steps=4, lr=3e-2, sample_steps=3, batch=2, progress=False)
    ).patch
    dumo = erase_dumo(
        tiny_sd,
        DumoConfig(
            [cat],
            retain_prompts=("a blue box", "a green cup", "a red ball"),
            width=0.5,
            buckets=4,
            steps=4,
            tlmo_steps=1,
            lr=1e-2,
            batch=2,
            sample_steps=3,
            resolution=32,
            progress=False,
        ),
    ).patch
    # c: every kind at once - a text-encoder patch, a LoRA, a skip-connection module.
    return {"a": [hirm], "b": [esd], "c": [hirm, esd, dumo], "d": []}


def _register(registry_root, patches) -> None:
    registry = open_registry(registry_root)
    for tenant, stack in patches.items():
        ids = [registry.put_patch(p.to_bytes()).id for p in stack]
        registry.set_tenant(tenant, ids)


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


@pytest.fixture(scope="module")
def expected(tiny_sd, patches):
    images = {(t, s): _offline(tiny_sd, patches[t], s) for t in TENANTS for s in (1, 2)}
    # The four stacks really differ for this prompt, so equality below means something.
    assert len({images[(t, 1)].tobytes() for t in TENANTS}) == 4
    return images


def test_one_batch_mixing_four_stacks(tmp_path, sd_model_path, patches, expected):
    _register(tmp_path / "registry", patches)
    threads = torch.get_num_threads()
    worker = GenerationAPI(
        ModelSettings(str(sd_model_path)), ServerConfig(), str(tmp_path / "registry")
    )
    worker.setup("cpu")
    try:
        items = [
            WorkItem(
                f"{t}-{s}",
                t,
                ImageGenerationRequest(prompt=PROMPT, seed=s, steps=3),
                s,
                time.time(),
            )
            for s in (1, 2)
            for t in TENANTS
        ]
        answers = worker.predict(items)
        for it, answer in zip(items, answers, strict=True):
            assert answer["status"] == 200, answer
            got = np.asarray(answer["images"][0]).astype(int)
            assert np.abs(got - expected[(it.tenant, it.seed)]).max() <= 1, it.tenant
            assert answer["record"].patches == [p.id for p in patches[it.tenant]]
        # Four stacks, one shared denoiser call per diffusion step (3 steps).
        assert {a["record"].denoiser_calls for a in answers} == {3}
    finally:
        torch.set_num_threads(threads)


def test_two_workers_under_concurrent_traffic(tmp_path, sd_model_path, patches, expected):
    _register(tmp_path / "registry", patches)
    server = start_tenant_server(tmp_path, sd_model_path, workers=2)
    try:
        jobs = [(t, s) for _ in range(3) for t in TENANTS for s in (1, 2)]

        def call(job):
            tenant, seed = job
            response = server.generate(tenant, PROMPT, seed)
            return job, response

        workers_seen = set()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for (tenant, seed), response in pool.map(call, jobs):
                assert response.status_code == 200, response.text
                got = images_of(response)[0].astype(int)
                assert np.abs(got - expected[(tenant, seed)]).max() <= 1, (tenant, seed)
                record = response.json()["conceptguard"]
                assert record["patches"] == [p.id for p in patches[tenant]]
                workers_seen.add(record["worker"])
        assert workers_seen == {0, 1}
    finally:
        server.process.stop()
