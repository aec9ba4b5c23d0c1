"""The README as a new user meets it: `conceptguard serve` with no arguments and the tour's
local-registry lines, run beside it in a clone's root, with the hub reachable in principle
(HF_HUB_OFFLINE unset, the hub and every proxy pointed at a recorder on loopback).

The server loads the embedded model without a network request, listens on the interface
address asked for, keeps its registry in the user's data directory (the tour never touches
it), prints no warning that is not the user's concern, and stops on SIGINT although it was
started the way a shell starts a background job (SIGINT ignored). A hub id is tried on the
hub and refused with a message naming the hub, not a variable the user never set."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from conftest import text_encoder_patch
from server_process import free_port

from patches.loading import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"  # an interface address that is none of 127.0.0.1, 0.0.0.0, ::
# Output that would be noise to a user: warnings of libraries, leaked resources, tracebacks.
NOISE = re.compile(r"warn|leaked|torchvision|traceback|Loading (pipeline|weights)", re.I)


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in for the hub and any proxy: records every request, answers 404."""

    seen: list[str]

    def _answer(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_CONNECT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder():
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler.seen
    server.shutdown()
    server.server_close()


@pytest.fixture
def user_env(tmp_path, recorder):
    """A user's environment: a fresh home, the hub allowed but only reachable at the
    recorder, every proxy the recorder too."""
    url, _ = recorder
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "XDG_DATA_HOME")}
    home = tmp_path / "home"
    home.mkdir()
    proxies = {k: url for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    return {**env, **proxies, "HOME": str(home), "HF_ENDPOINT": url, "NO_PROXY": ""}


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a shell script does


def _tour_registry_lines() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    found = [shlex.split(line) for line in lines if line.startswith("conceptguard registry")]
    assert len(found) >= 4, "the README tour's local-registry lines moved"
    return found


def test_serve_and_the_tour_beside_it(tmp_path, user_env, recorder):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conceptguard.cli",
                "serve",
                "--host",
                HOST,
                "--port",
                str(port),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=user_env,
            start_new_session=True,
            preexec_fn=_ignore_sigint,
        )
    try:
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        assert process.poll() is None, log.read_text()
        state = Path(user_env["HOME"]) / ".local/share/conceptguard/registry/state.json"
        served = state.read_bytes()

        # The tour's local-registry lines, in a clone's root, with a patch made there.
        clone = tmp_path / "clone"
        clone.mkdir()
        pipe = load_pipeline(ROOT / "models" / "minicanvas")
        text_encoder_patch(pipe, patch_name="circle").save(clone / "circle.safetensors")
        for argv in _tour_registry_lines():
            result = subprocess.run(
                [sys.executable, "-m", "conceptguard.cli", *argv[1:]],
                cwd=clone,
                env=user_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, (argv, result.stderr)
            assert not NOISE.search(result.stdout + result.stderr), result.stderr
        listing = json.loads(result.stdout)
        assert [t["tenant"] for t in listing["tenants"]] == ["acme"]
        assert state.read_bytes() == served  # the running server's registry is untouched
        assert requests.get(url + "/health", timeout=10).status_code == 200

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    output = log.read_text()
    assert f"on http://{HOST}:{port} (registry {state.parent}" in output
    assert "server stopped" in output
    assert not NOISE.search(output), output
    _, seen = recorder
    assert seen == []  # the embedded model never touched the network


def test_a_hub_id_is_fetched_from_the_hub_or_refused_naming_it(user_env, recorder):
    url, seen = recorder
    result = subprocess.run(
        [sys.executable, "-m", "conceptguard.cli", "serve", "--model", "someorg/no-such-model"],
        env=user_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"the model hub at {url} has no model 'someorg/no-such-model'" in result.stderr
    assert "HF_HUB_OFFLINE" not in result.stderr and "Traceback" not in result.stderr
    assert any("someorg/no-such-model" in request for request in seen)


def test_host_must_be_an_address(user_env):
    result = subprocess.run(
        [sys.executable, "-m", "conceptguard.cli", "serve", "--host", "example"],
        env=user_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "not an IP address" in result.stderr
