"""The official `openai` client against a real `conceptguard serve`: the images fields it sends
are accepted (those with a meaning here applied, the others listed as ignored), the served
model is listed, and what the server does not do is a typed error naming it."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image
from tenant_server import ADMIN_KEY, GENERATE, TENANT_KEYS, bearer, images_of, start_tenant_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd_model_path):
    running = start_tenant_server(tmp_path_factory.mktemp("openai"), sd_model_path, workers=1)
    yield running
    running.process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=TENANT_KEYS["a"], max_retries=0, timeout=120
    )


def _decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_generate_with_the_fields_openai_clients_send(client):
    result = client.images.generate(
        prompt="a red circle",
        quality="high",
        style="vivid",
        output_format="jpeg",
        output_compression=80,
        size="auto",
        background="opaque",
        moderation="low",
        n=1,
        extra_body={"seed": 3, "steps": 2},
    )
    image = _decoded(result.data[0])
    assert image.format == "JPEG" and image.size == (64, 64)  # the tiny SD's native size
    assert result.output_format == "jpeg" and result.size == "64x64"
    record = result.model_extra["conceptguard"]
    assert record["ignored"] == {"quality": "high", "style": "vivid", "moderation": "low"}

    webp = client.images.generate(
        prompt="a red circle", output_format="webp", extra_body={"seed": 3, "steps": 2}
    )
    assert _decoded(webp.data[0]).format == "WEBP"


def test_png_is_the_default_and_lossless(server, client):
    body = {"prompt": "a red circle", "seed": 4, "steps": 2}
    plain = requests.post(
        server.url + GENERATE, json=body, headers=bearer(TENANT_KEYS["a"]), timeout=120
    )
    assert plain.status_code == 200, plain.text
    result = client.images.generate(**{"prompt": body["prompt"]}, extra_body=body)
    image = _decoded(result.data[0])
    assert image.format == "PNG"
    assert np.array_equal(np.asarray(image), images_of(plain)[0])


def test_models_list_names_the_served_model(client, server):
    (model,) = client.models.list().data
    assert model.id == "tiny-sd-seed0"  # the served folder's name, never its path
    assert client.models.retrieve(model.id).id == model.id
    with pytest.raises(openai.NotFoundError, match="serves one model"):
        client.models.retrieve("dall-e-3")
    admin = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    assert [m.id for m in admin.models.list().data] == [model.id]


def test_what_is_not_supported_is_a_typed_error_naming_it(client):
    picture = io.BytesIO()
    Image.new("RGB", (64, 64)).save(picture, format="PNG")
    with pytest.raises(openai.NotFoundError, match="image edits") as edit:
        client.images.edit(image=("in.png", picture.getvalue()), prompt="a square")
    assert edit.value.code == "route_not_found" and edit.value.type == "RouteNotFound"
    with pytest.raises(openai.NotFoundError, match="image variations"):
        client.images.create_variation(image=("in.png", picture.getvalue()))
    with pytest.raises(openai.BadRequestError, match="streamed partial images") as stream:
        client.images.generate(prompt="a red circle", stream=True)
    assert stream.value.code == "invalid_request"
    with pytest.raises(openai.BadRequestError, match="opaque"):
        client.images.generate(prompt="a red circle", background="transparent")
    with pytest.raises(openai.BadRequestError, match="output_format"):
        client.images.generate(prompt="a red circle", output_format="gif")


def test_every_error_has_the_one_shape(server):
    """Unknown routes, wrong methods and unreadable bodies answer like every other error."""
    answers = [
        requests.get(server.url + "/v1/chat/completions", timeout=30),
        requests.get(server.url + GENERATE, timeout=30),
        requests.put(
            server.url + "/v1/tenants/a",
            data=b"\xff\xfe{",
            headers={**bearer(ADMIN_KEY), "Content-Type": "application/json"},
            timeout=30,
        ),
    ]
    assert [a.status_code for a in answers] == [404, 405, 400]
    assert answers[1].headers["allow"] == "POST"
    for answer in answers:
        error = answer.json()["error"]
        assert set(error) == {"type", "code", "message"} and error["message"]
