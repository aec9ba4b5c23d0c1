"""One worker's batches, in process: per-row failure, batch-independent images, and the
served stack against Patch.apply on a plain pipeline."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from conftest import text_encoder_patch
from PIL import Image

from patches.registry import open_registry
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.image_encoding import images_response
from server.schemas import ImageGenerationRequest, WorkItem


@pytest.fixture(scope="module")
def api(tmp_path_factory, sd_model_path, tiny_sd):
    folder = tmp_path_factory.mktemp("worker")
    registry = open_registry(folder / "registry")
    good = registry.put_patch(text_encoder_patch(tiny_sd, seed=21).to_bytes(), name="good")
    bad = registry.put_patch(text_encoder_patch(tiny_sd, seed=22).to_bytes(), name="bad")
    (registry.root / "blobs" / f"{bad.id}.safetensors").write_bytes(b"corrupt" * 50)
    registry.set_tenant("a", ["good"])
    registry.set_tenant("c", ["bad"])
    threads = torch.get_num_threads()
    worker = GenerationAPI(ModelSettings(str(sd_model_path)), ServerConfig(), str(registry.root))
    worker.setup("cpu")
    worker.good_patch = good.id
    yield worker
    torch.set_num_threads(threads)


def item(tenant: str, prompt: str = "a red circle", seed: int = 1, **extra) -> WorkItem:
    request = ImageGenerationRequest(prompt=prompt, seed=seed, steps=3, **extra)
    return WorkItem(f"{tenant}-{seed}", tenant, request, seed, time.time())


def pixels(answer: dict) -> list[np.ndarray]:
    return [np.asarray(image) for image in answer["images"]]


def test_a_failed_tenant_fails_only_its_rows(api):
    answers = api.predict([item("c"), item("b"), item("a"), item("c", seed=2)])
    assert [a["status"] for a in answers] == [503, 200, 200, 503]
    assert "RegistryCorrupt" in answers[0]["body"]["detail"]
    assert answers[0]["body"]["error"]["type"] == "StackNotReady"
    assert answers[1]["record"].patches == []
    assert answers[2]["record"].patches == [api.good_patch]
    assert answers[2]["record"].batch_requests == 4
    # The worker hands back pixels; the API process encodes them as the request asks.
    encoded = api.encode_response(answers[2])
    assert encoded["status"] == 200 and encoded["record"]["tenant"] == "a"
    assert np.array_equal(encoded["images"][0], pixels(answers[2])[0])
    body = images_response(encoded, item("a").request)
    png = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert np.array_equal(np.asarray(png), pixels(answers[2])[0])
    stock = io.BytesIO()
    answers[2]["images"][0].save(stock, format="PNG")  # the worker's own PNG, as it was
    assert base64.b64decode(body["data"][0]["b64_json"]) == stock.getvalue()
    assert body["conceptguard"]["tenant"] == "a" and body["output_format"] == "png"
    assert api.encode_response(answers[0]) == {"status": 503, "body": answers[0]["body"]}


def test_an_image_does_not_depend_on_its_batch(api):
    alone = pixels(api.predict([item("a", seed=5)])[0])
    mixed = api.predict(
        [item("b", "other", seed=9), item("a", seed=5), item("b", seed=5, n=2), item("a", seed=6)]
    )
    together = pixels(mixed[1])
    # Per-row generators make the noise identical; only CPU rounding of a larger batch can
    # differ (measured ~1.5e-6 in float), which may move a pixel by one level.
    assert np.abs(alone[0].astype(int) - together[0].astype(int)).max() <= 1
    # Image j of a request with seed s is the image of seed s + j alone.
    pair = pixels(mixed[2])
    seed6_b = pixels(api.predict([item("b", seed=6)])[0])
    assert np.abs(pair[1].astype(int) - seed6_b[0].astype(int)).max() <= 1


def test_the_served_stack_equals_patch_apply(api, tiny_sd):
    served = pixels(api.predict([item("a", "a blue square", seed=3)])[0])[0]
    patch = open_registry(api.registry_path).load_patch(api.good_patch)
    patch.apply(tiny_sd)
    try:
        tiny_sd.set_progress_bar_config(disable=True)
        expected = tiny_sd(
            "a blue square",
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(3),
        ).images[0]
    finally:
        patch.remove(tiny_sd)
    difference = np.abs(served.astype(int) - np.asarray(expected).astype(int))
    assert difference.max() <= 1, difference.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels", [3, 1])
def test_device_rounding_equals_diffusers_pil_output(tiny_sd, dtype, channels):
    from server.generation import pil_images

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, channels, 8, 8, generator=g)
    # Values whose x255 lands exactly on .5 (round half to even) and the ends of the range.
    image[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])
    image[0, 0, 1, :2] = torch.tensor([0.0, 127.5 / 255])
    image = image.to(dtype)
    ours = pil_images(image)
    theirs = tiny_sd.image_processor.numpy_to_pil(tiny_sd.image_processor.pt_to_numpy(image))
    assert [im.mode for im in ours] == [im.mode for im in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
