"""Issue 17 against a real server (one worker, the tiny SD pipeline, 127.0.0.1): one tenant
never hurts another, the registry never fails open, bodies are read only after the caller is
known and never unbounded, uploads stream to disk, and answers say what happened."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from conftest import run_conceptguard, text_encoder_patch
from prometheus_client.parser import text_string_to_metric_families
from raw_http import (
    PeakRss,
    answer_so_far,
    api_process,
    open_request,
    read_response,
    request,
)
from safetensors.torch import save_file
from tenant_server import ADMIN_KEY, GENERATE, TENANT_KEYS, bearer, start_tenant_server

from patches.manifest import METADATA_KEY
from patches.patch import Patch
from patches.targets import hash_named_tensors

MAX_PATCH_BYTES = 300 * 2**20
UPLOAD_SLOTS = 2
MiB = 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd_model_path):
    running = start_tenant_server(
        tmp_path_factory.mktemp("hardening-server"),
        sd_model_path,
        workers=1,
        # A long batch window, so concurrent requests of two tenants share a batch.
        batching={"max_batch_size": 8, "batch_timeout_s": 0.2},
        max_patch_bytes=MAX_PATCH_BYTES,
        max_concurrent_uploads=UPLOAD_SLOTS,
    )
    yield running
    running.process.stop()


def _error(response: requests.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["type"]


def _samples(server) -> Counter:
    values: Counter = Counter()
    for family in text_string_to_metric_families(server.metrics_text()):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            values[(sample.name, labels)] += sample.value
    return values


def _delta(before: Counter, after: Counter, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before[key]


def _upload(server, data: bytes, name: str | None = None) -> requests.Response:
    params = {"name": name} if name else None
    return server.admin("POST", "/v1/patches", params=params, data=data)


# --- 1: a prompt a model cannot encode fails its own request, in the API process ----------


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_text_a_model_cannot_encode_fails_that_request_only(server, field):
    before = _samples(server)
    bad = {field: "a red \ud800 circle"} if field == "negative_prompt" else {}
    bad_prompt = "a red \ud800 circle" if field == "prompt" else "a red circle"
    calls = [("a", bad_prompt, bad), ("b", "a red circle", {})] * 4
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(server.generate, t, p, 1, **extra) for t, p, extra in calls]
        answers = [(tenant, f.result()) for (tenant, _, _), f in zip(calls, futures, strict=True)]
    for tenant, response in answers:
        if tenant == "a":
            assert _error(response) == (400, "InvalidRequest"), response.text
            assert f"{field}: contains a lone surrogate" in response.json()["detail"]
        else:
            assert response.status_code == 200, response.text
    after = _samples(server)
    # The refused requests never reached a worker: its batches held B's rows only.
    assert _delta(before, after, "conceptguard_batch_requests_sum") == 4
    assert _delta(before, after, "conceptguard_requests_total", tenant="a", status="400") == 4


@pytest.mark.parametrize("text", ["nul\x00byte", "escape \x1b[31m red", "bell\x07"])
def test_control_characters_are_refused(server, text):
    response = server.generate("a", text)
    assert _error(response) == (400, "InvalidRequest")
    assert "prompt: contains a control character" in response.json()["detail"]


# --- 3: the caller is known before a body is read, and every body is bounded -------------


@pytest.mark.parametrize(
    ("method", "path", "key", "status"),
    [
        ("PUT", "/v1/tenants/a", None, 401),
        ("POST", "/v1/tenants/a/rollback", None, 401),
        ("POST", "/v1/patches", None, 401),
        ("PUT", "/v1/tenants/a", TENANT_KEYS["a"], 403),
    ],
)
def test_a_huge_body_is_answered_before_it_is_read(server, method, path, key, status):
    port = server.process.port
    headers = [("Content-Type", "application/json"), ("Content-Length", str(800 * MiB))]
    headers += [("Authorization", f"Bearer {key}")] if key else []
    body_part = b"[" * (256 * 1024)
    with (
        PeakRss(api_process(port).pid) as rss,
        open_request(port, method, path, headers, body_part) as sock,
    ):
        answer = read_response(sock)  # an 800 MB body that never comes: answer now
    assert answer.status == status, answer.body
    assert rss.growth < 16 * MiB


@pytest.mark.parametrize(
    ("method", "path", "key"),
    [
        ("PUT", "/v1/tenants/a", ADMIN_KEY),
        ("POST", "/v1/tenants/a/rollback", ADMIN_KEY),
        ("POST", GENERATE, TENANT_KEYS["a"]),
    ],
)
def test_json_bodies_over_a_mebibyte_are_413_unread(server, method, path, key):
    headers = [("Authorization", f"Bearer {key}"), ("Content-Length", str(2 * MiB))]
    with open_request(server.process.port, method, path, headers) as sock:
        answer = read_response(sock)
    assert answer.status == 413
    assert b"PayloadTooLarge" in answer.body and b"the limit is 1048576 bytes" in answer.body


# --- 5: JSON nesting bombs are 400s with a reason, counted --------------------------------

BOMB = "[" * 100_000 + "]" * 100_000


def _manifest_bomb(tiny_sd) -> bytes:
    patch = text_encoder_patch(tiny_sd, seed=41)
    text = patch.manifest.to_json().replace('"params":{}', '"params":{"x":' + BOMB + "}")
    data = {name: tensor.contiguous() for name, tensor in patch.tensors.items()}
    from safetensors.torch import save

    return save(data, metadata={METADATA_KEY: text})


def test_json_nesting_bombs_are_400s_and_counted(server, tiny_sd):
    before = _samples(server)
    generation = requests.post(
        server.url + GENERATE,
        data='{"prompt": "x", "user": ' + BOMB + "}",
        headers={**bearer(TENANT_KEYS["a"]), "Content-Type": "application/json"},
        timeout=60,
    )
    assert _error(generation) == (400, "InvalidRequest"), generation.text
    assert "nested more than" in generation.json()["detail"]
    after = _samples(server)
    assert _delta(before, after, "conceptguard_requests_total", tenant="a", status="400") == 1
    assert _delta(before, after, "conceptguard_refusals_total", reason="invalid_request") == 1

    stack = server.admin("PUT", "/v1/tenants/a", data='{"patches": ' + BOMB + "}")
    assert _error(stack) == (400, "InvalidRequest")
    header = BOMB.encode()
    assert _error(_upload(server, len(header).to_bytes(8, "little") + header)) == (
        400,
        "HeaderNotJSON",
    )
    assert _error(_upload(server, _manifest_bomb(tiny_sd))) == (400, "ManifestNotJSON")


# --- 9: uploads stream to disk, a few at a time -------------------------------------------


def _large_patch_file(tiny_sd, path, size: int) -> None:
    """A valid patch file of `size` bytes for the served model, except that its one tensor
    is not a parameter of the text encoder: checked in full, then refused (422)."""
    name = "text_model.encoder.layers.0.padding.weight"
    tensor = torch.zeros(size // 4)
    manifest = text_encoder_patch(tiny_sd).manifest.model_copy(
        update={"content_sha256": hash_named_tensors([(name, tensor)], None)}
    )
    save_file({name: tensor}, str(path), metadata={METADATA_KEY: manifest.to_json()})


def test_a_large_upload_streams_to_disk(server, tiny_sd, tmp_path):
    api = api_process(server.process.port)
    for size in (8 * MiB, 256 * MiB):  # the first pays one-time costs (imports, threads)
        path = tmp_path / f"large-{size}.safetensors"
        _large_patch_file(tiny_sd, path, size)
        with PeakRss(api.pid) as rss, open(path, "rb") as file:
            response = server.admin("POST", "/v1/patches", data=file)
        assert _error(response) == (422, "UnknownTensorName"), response.text
        print(f"\nAPI process growth during a {size // MiB} MiB upload: {rss.growth / MiB:.1f} MiB")
    assert rss.growth < 32 * MiB


def test_uploads_beyond_the_slots_get_429_with_retry_after(server):
    port = server.process.port
    headers = [("Authorization", f"Bearer {ADMIN_KEY}"), ("Content-Length", str(10 * MiB))]
    slow: list = []
    try:
        # Two uploads that stop in their body hold both slots - once each has taken one: a
        # probe can take a slot first (the slow ones wait for the threadpool to check their
        # key), and a slow upload that arrives then is the one refused. So slow uploads that
        # got an answer are replaced until a probe is the one refused. Bounded.
        deadline = time.monotonic() + 20
        seen: Counter = Counter()
        while True:
            for sock in [s for s in slow if answer_so_far(s)]:
                seen[answer_so_far(sock).split(b"\r\n")[0]] += 1
                slow.remove(sock)
                sock.close()
            while len(slow) < UPLOAD_SLOTS:
                slow.append(open_request(port, "POST", "/v1/patches", headers, b"\0" * 65536))
            response = _upload(server, b"x" * 100)
            holding = not any(answer_so_far(s) for s in slow)
            if (response.status_code == 429 and holding) or time.monotonic() > deadline:
                break
            seen[response.status_code] += 1
            time.sleep(0.05)
        assert _error(response) == (429, "TooManyUploads"), (response.text, seen)
        assert response.headers["Retry-After"] == "5"
    finally:
        for sock in slow:
            sock.close()
    deadline = time.monotonic() + 10
    response = _upload(server, b"x" * 100)
    while response.status_code == 429 and time.monotonic() < deadline:
        response = _upload(server, b"x" * 100)
    assert response.status_code == 400  # a slot again; and this is no patch file


# --- 10: keys, tenants, names and answers that say what happened --------------------------


@pytest.mark.parametrize(
    ("method", "path", "keys"),
    [
        ("POST", GENERATE, [TENANT_KEYS["a"], TENANT_KEYS["b"]]),
        ("POST", GENERATE, ["wrong", TENANT_KEYS["b"]]),
        ("GET", "/v1/patches", [ADMIN_KEY, TENANT_KEYS["a"]]),
        ("GET", "/metrics", [ADMIN_KEY, ADMIN_KEY]),
    ],
)
def test_two_authorization_headers_are_refused(server, method, path, keys):
    headers = [("Authorization", f"Bearer {key}") for key in keys]
    body = b'{"prompt": "a red circle", "steps": 3}' if path == GENERATE else b""
    answer = request(server.process.port, method, path, headers, body)
    assert answer.status == 400, answer.body
    assert b"2 Authorization headers; send exactly one" in answer.body


def test_a_tenant_that_is_not_configured_must_be_created_explicitly(server):
    typo = server.admin("PUT", "/v1/tenants/acmee", json={"patches": []})
    assert _error(typo) == (404, "TenantNotFound")
    assert "not configured on this server (configured: a, b, c, d)" in typo.json()["detail"]
    assert server.admin("GET", "/v1/tenants/acmee").status_code == 404  # nothing written
    created = server.admin("PUT", "/v1/tenants/acmee?create=true", json={"patches": []})
    assert created.status_code == 200, created.text
    again = server.admin("PUT", "/v1/tenants/acmee", json={"patches": []})
    assert again.status_code == 200  # it has a record now
    assert _error(server.admin("DELETE", "/v1/tenants/a")) == (409, "TenantConfigured")
    deleted = server.admin("DELETE", "/v1/tenants/acmee")
    assert deleted.status_code == 200 and deleted.json()["deleted"]["tenant"] == "acmee"
    assert _error(server.admin("DELETE", "/v1/tenants/acmee")) == (404, "TenantNotFound")

    connect = ["--server", server.url, "--admin-key", ADMIN_KEY]
    refused = run_conceptguard("tenant", "set", "acmee", *connect)
    assert refused.returncode == 2 and "TenantNotFound" in refused.stderr
    assert run_conceptguard("tenant", "set", "acmee", "--create", *connect).returncode == 0
    removed = run_conceptguard("tenant", "delete", "acmee", *connect)
    assert removed.returncode == 0 and "deleted tenant acmee" in removed.stdout


def test_a_manifest_name_that_is_not_a_plain_name_is_refused(server, tiny_sd):
    assert _upload(server, text_encoder_patch(tiny_sd, seed=21).to_bytes(), "x").status_code == 201
    patch = text_encoder_patch(tiny_sd, seed=22)
    hostile = Patch(patch.manifest.model_copy(update={"name": "../../x"}), patch.tensors)
    refused = _upload(server, hostile.to_bytes())
    assert _error(refused) == (400, "InvalidName")
    assert "'../../x', which is not a plain patch name" in refused.json()["detail"]
    assert server.admin("GET", "/v1/patches/x@2").status_code == 404


def test_identical_bytes_are_answered_honestly(server, tiny_sd):
    data = text_encoder_patch(tiny_sd, seed=23).to_bytes()
    first = _upload(server, data, "honest")
    assert first.status_code == 201
    for name in (None, "honest"):
        again = _upload(server, data, name)
        assert (again.status_code, again.json()) == (200, first.json())
    renamed = _upload(server, data, "other")
    assert _error(renamed) == (409, "PatchExists")
    assert "registered already as honest@1" in renamed.json()["detail"]


def test_fail_closed_answers_show_no_server_paths(server, tiny_sd):
    patch = text_encoder_patch(tiny_sd, seed=24)
    assert _upload(server, patch.to_bytes(), "doomed").status_code == 201
    (server.registry / "blobs" / f"{patch.id}.safetensors").write_bytes(b"damaged" * 40)
    assert server.admin("PUT", "/v1/tenants/c", json={"patches": ["doomed"]}).status_code == 200
    response = server.generate("c")
    assert _error(response) == (503, "StackNotReady")
    assert f"blobs/{patch.id}.safetensors" in response.json()["detail"]
    assert str(server.registry.parent) not in response.text
    assert server.admin("PUT", "/v1/tenants/c", json={"patches": []}).status_code == 200


# --- 2: a missing state serves nobody and is never re-initialised (last: it moves state) --


def test_a_missing_state_fails_every_tenant_closed_until_recovered(server, tiny_sd, tmp_path):
    ids = []
    for seed in (31, 32):
        response = _upload(server, text_encoder_patch(tiny_sd, seed=seed).to_bytes())
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    assert server.admin("PUT", "/v1/tenants/a", json={"patches": ids}).status_code == 200
    _, record = server.image("a")
    assert record["patches"] == ids
    generation = record["generation"]

    state, moved = server.registry / "state.json", tmp_path / "state.json"
    blobs = sorted(p.name for p in (server.registry / "blobs").iterdir())
    shutil.move(state, moved)
    try:
        for tenant in ("a", "b"):
            response = server.generate(tenant)
            assert _error(response) == (503, "RegistryUnavailable"), response.text
            assert "state.json is missing" in response.json()["detail"]
            assert str(server.registry.parent) not in response.text
        write = server.admin("PUT", "/v1/tenants/a", json={"patches": []})
        assert _error(write) == (503, "RegistryStateMissing")
        upload = _upload(server, text_encoder_patch(tiny_sd, seed=33).to_bytes())
        assert _error(upload) == (503, "RegistryStateMissing")
        assert not state.exists()
        assert sorted(p.name for p in (server.registry / "blobs").iterdir()) == blobs
        check = run_conceptguard("registry", "--dir", str(server.registry), "check")
        assert check.returncode == 1 and "state.json is missing" in check.stdout
    finally:
        if not state.exists():
            recover = ("registry", "--dir", str(server.registry), "recover", "--from")
            recovered = run_conceptguard(*recover, str(moved))
            assert recovered.returncode == 0, recovered.stderr
    _, record = server.image("a")
    assert record["patches"] == ids and record["generation"] > generation
