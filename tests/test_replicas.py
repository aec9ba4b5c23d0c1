"""Two `conceptguard serve` processes sharing one registry are two replicas: a patch
registered and assigned through replica A is served by replica B from its next batch, with no
restart and no message between them (each worker asks the registry for changes before each
batch). This is the Kubernetes deployment with a ReadWriteMany registry volume, or with a
PostgreSQL database, on one host."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import text_encoder_patch
from registry_backends import BACKENDS, location
from server_process import start_server
from tenant_server import ADMIN_KEY, GENERATE, TENANT_KEYS, bearer, images_of, write_config

from patches.loading import load_pipeline

PROPAGATION_DEADLINE_S = 30.0


def _generate(url: str, tenant: str = "a") -> requests.Response:
    body = {"prompt": "a red circle", "seed": 1, "steps": 3}
    return requests.post(
        url + GENERATE, json=body, headers=bearer(TENANT_KEYS[tenant]), timeout=120
    )


def _admin(url: str, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, url + path, headers=bearer(ADMIN_KEY), timeout=60, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_patch_registered_on_one_replica_is_served_by_the_other(backend, tmp_path, sd_model_path):
    # The one shared registry: the RWX volume, or the database.
    registry = location(backend, tmp_path)
    config = write_config(tmp_path / "config.json")  # the same ConfigMap and keys for both
    args = ["--workers", "1", "--model", str(sd_model_path), "--registry", str(registry)]
    args += ["--config", str(config)]
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start_server, args, tmp_path / f"{r}.log") for r in "AB"]
        replicas = [s.result() for s in starts]
    a, b = replicas
    try:
        before = _generate(b.url)
        assert before.status_code == 200, before.text
        assert before.json()["conceptguard"]["patches"] == []

        patch = text_encoder_patch(load_pipeline(sd_model_path), seed=21)
        pushed = _admin(
            a.url, "POST", "/v1/patches", params={"name": "circle"}, data=patch.to_bytes()
        )
        assert pushed.status_code == 201, pushed.text
        assigned = _admin(a.url, "PUT", "/v1/tenants/a", json={"patches": ["circle"]})
        assert assigned.status_code == 200, assigned.text
        generation = assigned.json()["generation"]

        # B was told nothing; it must pick the change up from the shared registry.
        deadline = time.monotonic() + PROPAGATION_DEADLINE_S
        attempts = 0
        while True:
            attempts += 1
            after = _generate(b.url)
            assert after.status_code == 200, after.text
            record = after.json()["conceptguard"]
            if record["patches"] == [patch.id] or time.monotonic() > deadline:
                break
        assert record["patches"] == [patch.id], f"B still serves {record} after {attempts} tries"
        assert record["tenant_generation"] == generation
        assert record["generation"] >= generation
        assert not np.array_equal(images_of(after)[0], images_of(before)[0])
        # Generation is polled before every batch, so the very next request already sees it.
        assert attempts == 1

        # B's admin view and A's agree: one registry.
        assert _admin(b.url, "GET", "/v1/tenants/a").json()["stack"] == [patch.id]
    finally:
        for replica in replicas:
            replica.stop()
