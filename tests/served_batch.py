"""The references the per-row tests compare against: a stack applied offline with
`Patch.apply`, one worker batch of several tenants, a patch loaded by stock diffusers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from conftest import generate

from patches.patch import Patch
from patches.registry import open_registry
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.schemas import ImageGenerationRequest, WorkItem


def offline_image(pipe, stack: list[Patch], prompt: str, seed: int) -> np.ndarray:
    """The image a plain pipeline gives with `stack` applied (the server's defaults: 3
    steps in these tests, guidance 4)."""
    for patch in stack:
        patch.apply(pipe)
    try:
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            prompt,
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
    finally:
        for patch in reversed(stack):
            patch.remove(pipe)
    return np.asarray(image).astype(int)


def register(registry_root: Path, stacks: dict[str, list[Patch]]) -> None:
    registry = open_registry(registry_root)
    for tenant, stack in stacks.items():
        registry.set_tenant(tenant, [registry.put_patch(p.to_bytes()).id for p in stack])


def serve_one_batch(
    tmp_path: Path, model_path: Path, stacks: dict[str, list[Patch]], prompt: str, seeds=(1,)
) -> list[tuple[WorkItem, dict]]:
    """Every tenant's request at every seed, answered by one in-process worker in one batch."""
    register(tmp_path / "registry", stacks)
    threads = torch.get_num_threads()
    worker = GenerationAPI(
        ModelSettings(str(model_path)), ServerConfig(), str(tmp_path / "registry")
    )
    worker.setup("cpu")
    try:
        request = {s: ImageGenerationRequest(prompt=prompt, seed=s, steps=3) for s in seeds}
        items = [WorkItem(f"{t}-{s}", t, request[s], s, time.time()) for s in seeds for t in stacks]
        return list(zip(items, worker.predict(items), strict=True))
    finally:
        torch.set_num_threads(threads)


def assert_served_as_offline(answers, expected, stacks) -> None:
    """Each answer is its tenant's offline image (within one level of rounding), served with
    its stack, all rows in one denoiser call per step."""
    for item, answer in answers:
        assert answer["status"] == 200, answer
        got = np.asarray(answer["images"][0]).astype(int)
        assert np.abs(got - expected[(item.tenant, item.seed)]).max() <= 1, item.tenant
        assert answer["record"].patches == [p.id for p in stacks[item.tenant]]
    assert {a["record"].denoiser_calls for _, a in answers} == {3}


def assert_stock_diffusers_matches(pipe, path: Path, prompt: str) -> None:
    """A unet_lora patch file loads with `load_lora_weights` and draws what Patch.apply
    draws, and the edit does something."""
    patch = Patch.load(path)
    base = generate(pipe, prompt)
    patch.apply(pipe)
    try:
        ours = generate(pipe, prompt)
    finally:
        patch.remove(pipe)
    pipe.load_lora_weights(str(path))
    try:
        stock = generate(pipe, prompt)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(ours - base).max() > 1e-3
    assert np.abs(stock - ours).max() <= 1e-5
