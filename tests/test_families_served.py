"""SDXL and Flux served by one worker: a text-encoder-patched tenant and a base tenant in one
batch, each image equal to the stock pipeline with `Patch.apply` (same seed)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import text_encoder_patch

from bench.tiny_pipelines import tiny_pipeline
from patches.registry import open_registry
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.schemas import ImageGenerationRequest, WorkItem

PROMPT = "a red circle"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_patched_and_base_tenants_in_one_batch(family, models_dir, tmp_path):
    pipe = tiny_pipeline(family, models_dir, seed=0)
    pipe.set_progress_bar_config(disable=True)
    stack = [text_encoder_patch(pipe, seed=7, scale=0.3)]
    if family == "sdxl":
        stack.append(text_encoder_patch(pipe, seed=8, component="text_encoder_2", scale=0.3))
    registry = open_registry(tmp_path / "registry")
    registry.set_tenant("a", [registry.put_patch(p.to_bytes()).id for p in stack])
    threads = torch.get_num_threads()
    worker = GenerationAPI(
        ModelSettings(str(models_dir / f"tiny-{family}-seed0")), ServerConfig(), str(registry.root)
    )
    worker.setup("cpu")
    try:
        request = ImageGenerationRequest(prompt=PROMPT, seed=2, steps=3, size="64x64")
        items = [WorkItem(t, t, request, 2, time.time()) for t in ("a", "b")]
        answers = worker.predict(items)
    finally:
        torch.set_num_threads(threads)
    served = {
        it.tenant: np.asarray(a["images"][0]).astype(int)
        for it, a in zip(items, answers, strict=True)
    }

    def offline(patches) -> np.ndarray:
        for patch in patches:
            patch.apply(pipe)
        try:
            image = pipe(
                PROMPT,
                num_inference_steps=3,
                guidance_scale=4.0,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(2),
            ).images[0]
        finally:
            for patch in reversed(patches):
                patch.remove(pipe)
        return np.asarray(image).astype(int)

    base, patched = offline([]), offline(stack)
    assert not np.array_equal(base, patched)
    assert np.abs(served["b"] - base).max() <= 1
    assert np.abs(served["a"] - patched).max() <= 1


def test_serve_runs_a_flux_folder_over_http(models_dir, tmp_path):
    from tenant_server import images_of, start_tenant_server

    tiny_pipeline("flux", models_dir, seed=0)  # written to models_dir once
    server = start_tenant_server(tmp_path, models_dir / "tiny-flux-seed0", workers=1)
    try:
        response = server.generate("a", PROMPT, seed=4, size="64x64")
        assert response.status_code == 200, response.text
        assert images_of(response)[0].shape == (64, 64, 3)
    finally:
        server.process.stop()
