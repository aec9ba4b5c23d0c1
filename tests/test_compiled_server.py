"""`conceptguard serve --compile`: a real server on 127.0.0.1 whose worker serves through
torch.compile. Dynamo's eager backend stands in for inductor (the tracing, the padding and
the routing, without code generation, which only pays on a GPU). Tenants and patches that
change while it serves compile nothing: the worker's graph count on /metrics stays what its
warm-up left."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import generate, lora_patch
from prometheus_client.parser import text_string_to_metric_families
from tenant_server import start_tenant_server

from patches.loading import load_pipeline


def _graphs(server) -> float:
    families = {f.name: f for f in text_string_to_metric_families(server.metrics_text())}
    return sum(sample.value for sample in families["conceptguard_compiled_graphs"].samples)


def _assign(server, tenant: str, patch, name: str) -> int:
    pushed = server.admin("POST", "/v1/patches", params={"name": name}, data=patch.to_bytes())
    assert pushed.status_code == 201, pushed.text
    assigned = server.admin("PUT", f"/v1/tenants/{tenant}", json={"patches": [patch.id]})
    assert assigned.status_code == 200, assigned.text
    return assigned.json()["generation"]


def _offline(pipe, patch=None) -> np.ndarray:
    """The image the server must send (seed 1, 3 steps, guidance 4), made with the patch
    applied to an uncompiled pipeline, as 8-bit pixels."""
    if patch is not None:
        patch.apply(pipe)
    try:
        image = generate(pipe, "a red circle", seed=1, guidance_scale=4.0)[0]
    finally:
        if patch is not None:
            patch.remove(pipe)
    return np.round(image * 255).astype(int)


def _close(served: np.ndarray, expected: np.ndarray) -> bool:
    return np.abs(served.astype(int) - expected).max() <= 1  # PNG rounding


def test_tenants_and_patches_change_without_recompiling(tmp_path, sd_model_path):
    pipe = load_pipeline(sd_model_path)
    first, second, other = lora_patch(pipe, 1), lora_patch(pipe, 3, rank=8), lora_patch(pipe, 2)
    expected = {"base": _offline(pipe), "first": _offline(pipe, first)}
    expected |= {"second": _offline(pipe, second), "other": _offline(pipe, other)}
    assert not _close(expected["first"].astype(np.uint8), expected["base"])  # they differ
    server = start_tenant_server(
        tmp_path,
        sd_model_path,
        workers=1,
        env={"CONCEPTGUARD_COMPILE_BACKEND": "eager"},
        serve_args=["--compile", "default"],
        batching={"max_batch_size": 4, "batch_timeout_s": 0.1},
    )
    try:
        warm = _graphs(server)
        # Warm-up: batches of 1, 2, 4, 8 and 16 image rows (4 requests x 4 images at most),
        # a graph each for the denoiser (twice the rows with guidance) and the decoder.
        assert warm >= 5
        _assign(server, "a", first, "lora-a")
        _assign(server, "b", other, "lora-b")
        want = {"a": expected["first"], "b": expected["other"], "c": expected["base"]}

        def call(tenant: str):
            return tenant, server.image(tenant)

        # Concurrent rounds, so that the tenants' rows share batches of several sizes.
        with ThreadPoolExecutor(max_workers=6) as pool:
            for tenants in (["a", "b", "c"], ["a", "b", "c", "a", "b", "c"], ["b"]):
                for tenant, (image, record) in pool.map(call, tenants):
                    assert record["tenant"] == tenant
                    assert _close(image, want[tenant]), tenant
        several = server.generate("b", n=3)  # 3 image rows in one request: bucket 4
        assert several.status_code == 200 and len(several.json()["data"]) == 3
        generation = _assign(server, "a", second, "lora-a2")
        image, record = server.image("a")
        assert record["tenant_generation"] == generation
        assert _close(image, expected["second"])
        assert _graphs(server) == warm
    finally:
        server.process.stop()
