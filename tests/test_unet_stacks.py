"""Tenant stacks of every kind: HiRM only (a), ESD only (b), HiRM + ESD + DuMo (c), none (d).

In one worker's batch and through a real 2-worker server under concurrent traffic, every
image equals what that tenant's stack gives offline (Patch.apply on a plain pipeline, same
seed): no cross-talk between tenants whose rows share a worker or a batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from served_batch import assert_served_as_offline, offline_image, register, serve_one_batch
from tenant_server import images_of, start_tenant_server

from erasure.dumo import DumoConfig, erase_dumo
from erasure.esd import EsdConfig, erase_esd
from erasure.hirm import HirmConfig, erase_hirm
from erasure.prompts import ConceptSpec

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


@pytest.fixture(scope="module")
def expected(tiny_sd, patches):
    images = {
        (t, s): offline_image(tiny_sd, patches[t], PROMPT, s) for t in TENANTS for s in (1, 2)
    }
    # The four stacks really differ for this prompt, so equality below means something.
    assert len({images[(t, 1)].tobytes() for t in TENANTS}) == 4
    return images


def test_one_batch_mixing_four_stacks(tmp_path, sd_model_path, patches, expected):
    # Four stacks at two seeds in one batch: one shared denoiser call per step (3 steps).
    answers = serve_one_batch(tmp_path, sd_model_path, patches, PROMPT, seeds=(1, 2))
    assert_served_as_offline(answers, expected, patches)


def test_two_workers_under_concurrent_traffic(tmp_path, sd_model_path, patches, expected):
    register(tmp_path / "registry", patches)
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
