"""`conceptguard serve` as a real process group: the default model, keys from the
environment, generation over HTTP, shutdown (tenants, patches and request bounds:
test_server.py)."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import requests
from conftest import run_conceptguard
from PIL import Image
from server_process import port_is_open, start_server

GENERATE = "/v1/images/generations"
KEY = "serve-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # No --model: the embedded default model (the committed MiniCanvas pipeline).
    folder = tmp_path_factory.mktemp("serve")
    running = start_server(
        ["--workers", "2", "--registry", str(folder / "registry")],
        folder / "server.log",
        env={"CONCEPTGUARD_API_KEYS": f"default={KEY}"},
    )
    yield running
    running.stop()


def _image(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_generates_deterministic_pngs(server):
    body = {"prompt": "a red circle", "seed": 3, "steps": 3, "n": 2}
    first = requests.post(server.url + GENERATE, json=body, headers=AUTH, timeout=120)
    assert first.status_code == 200, first.text
    data = first.json()["data"]
    assert len(data) == 2
    images = [_image(item) for item in data]
    assert images[0].shape == (32, 32, 3)  # MiniCanvas draws 32x32
    second = requests.post(server.url + GENERATE, json=body, headers=AUTH, timeout=120)
    second = second.json()["data"]
    assert all(np.array_equal(a, _image(b)) for a, b in zip(images, second, strict=True))
    assert first.json()["conceptguard"]["seed"] == 3
    assert first.json()["conceptguard"]["tenant"] == "default"


def test_official_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    result = client.images.generate(
        prompt="a blue square",
        n=1,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "steps": 3},
    )
    assert _image(result.data[0].model_dump()).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("sig", "whole_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
    ids=["sigterm", "sigint", "ctrl-c-to-the-group"],
)
def test_signals_stop_every_process_and_free_the_port(sig, whole_group, tmp_path, sd_model_path):
    args = ["--workers", "2", "--model", str(sd_model_path), "--registry", str(tmp_path / "r")]
    running = start_server(args, tmp_path / "server.log")
    pgid = running.process.pid
    try:
        if whole_group:  # a terminal's Ctrl+C reaches every process of the foreground group
            os.killpg(pgid, sig)
        else:
            running.process.send_signal(sig)
        assert running.process.wait(timeout=60) == 0
        # Nothing of the group is left (multiprocessing's resource tracker may need a moment
        # after the main process to notice), and nothing holds the port.
        deadline = time.monotonic() + 20
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(pgid), subprocess.run(
            ["ps", "-o", "pid,stat,cmd", "-g", str(pgid)], capture_output=True, text=True
        ).stdout
        assert not port_is_open(running.port)
    finally:
        running.stop()  # a failed assertion above must not leave the group running
    log = running.log.read_text()
    assert "server stopped" in log
    assert "leaked semaphore" not in log
    # No key was configured: the server made one for this run and said so.
    assert "no API keys configured; keys for this run only" in log


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_bad_model_is_refused_before_serving(tmp_path):
    result = run_conceptguard("serve", "--model", str(tmp_path))
    assert result.returncode == 2
    assert "no model_index.json" in result.stderr
    assert "Traceback" not in result.stderr
