"""The multi-tenant server end to end: a real `conceptguard serve` with 2 workers on
127.0.0.1, real HTTP, a real registry (a directory, and a PostgreSQL database: every test
runs on both), patches made here on the served model."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import run_conceptguard, text_encoder_patch, unet_weights_patch
from prometheus_client.parser import text_string_to_metric_families
from registry_backends import BACKENDS, location, overwrite_blob
from server_process import free_port
from tenant_server import (
    ADMIN_KEY,
    GENERATE,
    METRICS_KEY,
    TENANT_KEYS,
    bearer,
    start_tenant_server,
)

from patches.loading import load_pipeline
from patches.patch import Patch
from patches.registry import open_registry

MAX_PATCH_BYTES = 200_000


@pytest.fixture(scope="module")
def served_model(sd_model_path) -> Path:
    """The model every test here serves (switching to the MiniCanvas model is this line)."""
    return sd_model_path


@pytest.fixture(scope="module")
def base_pipe(served_model):
    """The served model, loaded here to make patches for it."""
    return load_pipeline(served_model)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory, served_model):
    """The server on each registry backend (a directory, a PostgreSQL database)."""
    folder = tmp_path_factory.mktemp("tenant-server")
    running = start_tenant_server(
        folder,
        served_model,
        registry=location(request.param, folder),
        batching={"max_batch_size": 8, "batch_timeout_s": 0.05},
        max_patch_bytes=MAX_PATCH_BYTES,
    )
    yield running
    running.process.stop()


def _upload(server, patch, name: str) -> dict:
    response = server.admin("POST", "/v1/patches", params={"name": name}, data=patch.to_bytes())
    assert response.status_code == 201, response.text
    return response.json()


def _assign(server, tenant: str, stack: list[str]) -> dict:
    response = server.admin("PUT", f"/v1/tenants/{tenant}", json={"patches": stack})
    assert response.status_code == 200, response.text
    return response.json()


def test_runtime_patch_changes_its_tenant_only_and_rolls_back_exactly(server, base_pipe):
    _assign(server, "a", [])
    a_before, record = server.image("a")
    b_before, _ = server.image("b")
    assert record["tenant"] == "a" and record["patches"] == []

    patch = text_encoder_patch(base_pipe, seed=11)
    assert _upload(server, patch, "circle")["id"] == patch.id
    assigned = _assign(server, "a", ["circle"])
    workers = set()
    for _ in range(4):  # sequential requests, so any worker may answer each
        a_after, record = server.image("a")
        assert not np.array_equal(a_after, a_before)
        assert record["patches"] == [patch.id]
        assert record["tenant_generation"] == assigned["generation"]
        assert record["generation"] >= assigned["generation"]
        workers.add(record["worker"])
        b_after, b_record = server.image("b")
        assert np.array_equal(b_after, b_before)
        assert b_record["patches"] == []

    rolled = server.admin("POST", "/v1/tenants/a/rollback")
    assert rolled.status_code == 200 and rolled.json()["stack"] == []
    a_back, record = server.image("a")
    assert np.array_equal(a_back, a_before)
    assert record["patches"] == [] and record["generation"] == rolled.json()["generation"]


def test_corrupt_registry_entry_fails_its_tenant_only(server, base_pipe):
    patch = text_encoder_patch(base_pipe, seed=12)
    _upload(server, patch, "doomed")
    overwrite_blob(open_registry(server.registry, create=False), patch.id, b"no patch" * 40)
    _assign(server, "a", [patch.id])

    def call(tenant):
        return tenant, server.generate(tenant, seed=4)

    # Several rounds of concurrent requests, so that A's and B's rows share batches.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            results = list(pool.map(call, ["a", "a", "b", "a", "a", "b", "a", "a"]))
            for tenant, response in results:
                if tenant == "a":
                    assert response.status_code == 503, response.text
                    assert "could not be loaded: RegistryCorrupt" in response.json()["detail"]
                else:
                    assert response.status_code == 200, response.text
    server.admin("POST", "/v1/tenants/a/rollback")
    assert server.generate("a").status_code == 200


def test_official_openai_client_with_a_tenant_key(server):
    from openai import AuthenticationError, OpenAI

    def client(key):
        return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)

    result = client(TENANT_KEYS["b"]).images.generate(
        prompt="a blue square",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "steps": 3},
    )
    assert len(result.data) == 2 and result.data[0].b64_json
    with pytest.raises(AuthenticationError, match="unknown API key"):
        client("not-a-key").images.generate(prompt="x", response_format="b64_json")


@pytest.mark.parametrize(
    ("method", "path", "key", "status"),
    [
        ("POST", GENERATE, None, 401),
        ("POST", GENERATE, "wrong-key", 401),
        ("POST", GENERATE, ADMIN_KEY, 403),
        ("GET", "/v1/patches", None, 401),
        ("GET", "/v1/patches", "wrong-key", 401),
        ("GET", "/v1/patches", TENANT_KEYS["a"], 403),
        ("PUT", "/v1/tenants/a", TENANT_KEYS["a"], 403),
        ("POST", "/v1/tenants/a/rollback", TENANT_KEYS["b"], 403),
        ("DELETE", "/v1/patches/circle", TENANT_KEYS["a"], 403),
        ("POST", "/v1/patches", TENANT_KEYS["a"], 403),
        ("GET", "/health", None, 200),
        ("GET", "/metrics", None, 401),
        ("GET", "/metrics", TENANT_KEYS["a"], 403),
        ("GET", "/metrics", METRICS_KEY, 200),
        ("GET", "/metrics", ADMIN_KEY, 200),
        ("POST", GENERATE, METRICS_KEY, 403),
        ("GET", "/v1/patches", METRICS_KEY, 403),
    ],
)
def test_keys_and_roles(server, method, path, key, status):
    headers = bearer(key) if key else {}
    body = {"prompt": "a red circle", "steps": 3} if path == GENERATE else {"patches": []}
    response = requests.request(method, server.url + path, headers=headers, json=body, timeout=60)
    assert response.status_code == status, response.text
    if status >= 400:
        assert response.json()["error"]["type"] == {401: "Unauthorized", 403: "Forbidden"}[status]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"prompt": ""}, "prompt: must be 1 to 1000 characters"),
        ({"prompt": "x" * 1001}, "prompt: must be 1 to 1000 characters (got 1001)"),
        ({"prompt": "a", "negative_prompt": "x" * 1001}, "negative_prompt: must be at most"),
        ({"prompt": "a", "n": 5}, "n: must be 1 to 4 images"),
        ({"prompt": "a", "n": 0}, "n: must be 1 to 4 images"),
        # The default largest side is twice the model's native side (the tiny SD: 64).
        ({"prompt": "a", "size": "2048x64"}, "multiple of 8 between 32 and 128"),
        ({"prompt": "a", "size": "60x64"}, "multiple of 8"),
        ({"prompt": "a", "size": "big"}, "WIDTHxHEIGHT"),
        ({"prompt": "a", "steps": 101}, "steps: must be 1 to 100"),
        ({"prompt": "a", "response_format": "url"}, "response_format"),
        ({"prompt": "a", "tenant": "b"}, "tenant: a request may not name a tenant"),
        ({"prompt": "a", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_every_bound_is_a_400_with_its_reason(server, body, reason):
    response = requests.post(
        server.url + GENERATE, json=body, headers=bearer(TENANT_KEYS["a"]), timeout=60
    )
    assert response.status_code == 400
    assert reason in response.json()["detail"]


def test_admin_refusals(server, base_pipe, other_sd):
    def upload(data, **kwargs):
        return server.admin("POST", "/v1/patches", data=data, **kwargs)

    def error_type(response):
        return response.status_code, response.json()["error"]["type"]

    assert error_type(upload(b"\x00" * 64)) == (400, "HeaderNotJSON")
    assert error_type(upload(b"x" * (MAX_PATCH_BYTES + 1))) == (413, "PayloadTooLarge")
    wrong_base = upload(text_encoder_patch(other_sd).to_bytes())
    assert error_type(wrong_base) == (422, "BaseFingerprintMismatch")
    # Dense edits of layer weights are served per row (exact low-rank factors); a bias edit
    # cannot be, so it is refused at upload.
    assert upload(unet_weights_patch(base_pipe).to_bytes()).status_code == 201
    bias = dict(base_pipe.unet.named_parameters())["conv_in.bias"].detach() + 0.1
    dense_bias = Patch.create(
        pipe=base_pipe,
        kind="unet_weights",
        component="unet",
        method="test",
        concepts=["bias"],
        tensors={"conv_in.bias": bias},
    )
    assert error_type(upload(dense_bias.to_bytes())) == (422, "UnsupportedPatchKind")
    # A U-Net module of a type this server does not know: refused, never half-applied.
    unknown_module = Patch.create(
        pipe=base_pipe,
        kind="unet_module",
        component="unet",
        method="test",
        concepts=["x"],
        tensors={"module.weight": torch.zeros(4)},
        params={"module_type": "not-a-module-type"},
    )
    refused = upload(unknown_module.to_bytes())
    assert error_type(refused) == (422, "WrongTarget")
    assert "not-a-module-type" in refused.json()["detail"]

    form = {"file": ("p.safetensors", text_encoder_patch(base_pipe, seed=13).to_bytes())}
    multipart = server.admin("POST", "/v1/patches", files=form, data={"name": "multi"})
    assert multipart.status_code == 201 and multipart.json()["name"] == "multi"
    listed = server.admin("GET", "/v1/patches").json()
    assert "multi" in {p["name"] for p in listed["patches"]}

    _assign(server, "c", ["multi"])
    assert error_type(server.admin("DELETE", "/v1/patches/multi")) == (409, "PatchInUse")
    assert error_type(server.admin("DELETE", "/v1/patches/nothing")) == (404, "PatchNotFound")
    bad_ref = server.admin("PUT", "/v1/tenants/c", json={"patches": ["nothing"]})
    assert error_type(bad_ref) == (404, "PatchNotFound")
    bad_name = server.admin("PUT", "/v1/tenants/Not%20Valid", json={"patches": []})
    assert error_type(bad_name) == (400, "InvalidName")
    bad_body = server.admin("PUT", "/v1/tenants/c", json={"stack": []})
    assert error_type(bad_body) == (400, "InvalidRequest")
    assert error_type(server.admin("GET", "/v1/tenants/nobody")) == (404, "TenantNotFound")
    fresh = server.admin("POST", "/v1/tenants/nobody/rollback")
    assert error_type(fresh) == (404, "TenantNotFound")
    _assign(server, "c", [])
    assert server.admin("DELETE", "/v1/patches/multi").status_code == 200


def _samples(server) -> Counter:
    text = server.metrics_text()
    values: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            values[(sample.name, labels)] += sample.value
    return values


def test_metrics_count_the_requests_sent(server):
    before = _samples(server)
    for tenant, extra in [("a", {}), ("a", {}), ("a", {}), ("b", {}), ("b", {"n": 2})]:
        assert server.generate(tenant, **extra).status_code == 200
    assert server.generate("a", n=99).status_code == 400
    assert requests.post(server.url + GENERATE, json={"prompt": "x"}, timeout=30).status_code == 401
    after = _samples(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    assert delta("conceptguard_requests_total", tenant="a", status="200") == 3
    assert delta("conceptguard_requests_total", tenant="b", status="200") == 2
    assert delta("conceptguard_requests_total", tenant="a", status="400") == 1
    assert delta("conceptguard_requests_total", tenant="none", status="401") == 1
    assert delta("conceptguard_refusals_total", reason="invalid_request") == 1
    assert delta("conceptguard_refusals_total", reason="unauthorized") == 1
    assert delta("conceptguard_request_seconds_count", tenant="a") == 4
    assert delta("conceptguard_images_total", tenant="a") == 3
    assert delta("conceptguard_images_total", tenant="b") == 3
    # Refused requests never reach a worker: 5 requests in the workers' batches.
    assert delta("conceptguard_batch_requests_sum") == 5
    assert delta("conceptguard_queue_wait_seconds_count") == 5
    batches = delta("conceptguard_batch_requests_count")
    assert 1 <= batches <= 5
    assert delta("conceptguard_stage_seconds_count", stage="denoise") == batches
    # Every request answered: nothing in flight (a livesum over the API processes).
    assert after[("conceptguard_requests_in_flight", ())] == 0
    generation = server.admin("GET", "/v1/patches").json()["generation"]
    seen = [v for (name, _), v in after.items() if name == "conceptguard_registry_generation"]
    assert seen and max(seen) == generation


def test_admin_operations_and_their_refusals_are_counted(server, base_pipe):
    before = _samples(server)
    patch = text_encoder_patch(base_pipe, seed=15)
    assert server.admin("POST", "/v1/patches", data=patch.to_bytes()).status_code == 201
    assert server.admin("POST", "/v1/patches", data=b"not a patch").status_code == 400
    _assign(server, "d", [patch.id])
    _assign(server, "d", [])
    assert server.admin("DELETE", f"/v1/patches/{patch.id}").status_code == 200
    assert server.admin("DELETE", f"/v1/patches/{patch.id}").status_code == 404
    assert server.admin("GET", "/v1/no-such-route").status_code == 404
    after = _samples(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    routes = "conceptguard_http_requests_total"
    assert delta(routes, route="POST /v1/patches", status="201") == 1
    assert delta(routes, route="POST /v1/patches", status="400") == 1
    assert delta(routes, route="PUT /v1/tenants/{tenant}", status="200") == 2
    assert delta(routes, route="DELETE /v1/patches/{ref}", status="200") == 1
    assert delta(routes, route="DELETE /v1/patches/{ref}", status="404") == 1
    assert delta(routes, route="unmatched", status="404") == 1
    assert delta("conceptguard_refusals_total", reason="invalid_request") == 1
    assert delta("conceptguard_refusals_total", reason="not_found") == 2
    # Per-worker gauges are per worker slot: no process id, so no new series per restart.
    families = {f.name: f for f in text_string_to_metric_families(server.metrics_text())}
    generation = families["conceptguard_registry_generation"].samples
    assert sorted(sample.labels["worker"] for sample in generation) == ["0", "1"]
    assert all("pid" not in sample.labels for sample in generation)
    # Each worker generated once before it reported ready (issue 18's warm-up).
    warm_up = families["conceptguard_worker_warm_up_seconds"].samples
    assert sorted(sample.labels["worker"] for sample in warm_up) == ["0", "1"]
    assert all(sample.value > 0 for sample in warm_up)


def test_cli_push_and_tenant_commands(server, base_pipe, tmp_path):
    path = tmp_path / "cli.safetensors"
    patch = text_encoder_patch(base_pipe, seed=14)
    patch.save(path)
    connect = ["--server", server.url, "--admin-key", ADMIN_KEY]
    pushed = run_conceptguard("patch", "push", str(path), "--name", "cli-patch", *connect)
    assert pushed.returncode == 0, pushed.stderr
    assert f"pushed cli-patch@1 ({patch.id[:12]}" in pushed.stdout
    _assign(server, "c", [])
    assigned = run_conceptguard("tenant", "set", "c", "cli-patch", *connect)
    assert assigned.returncode == 0 and patch.id[:12] in assigned.stdout
    assert server.image("c")[1]["patches"] == [patch.id]
    rolled = run_conceptguard("tenant", "rollback", "c", "--json", *connect)
    assert rolled.returncode == 0, rolled.stderr
    assert '"stack": []' in rolled.stdout
    refused = run_conceptguard(
        "tenant", "show", "nobody", "--server", server.url, "--admin-key", "x"
    )
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        == "conceptguard: ServerRefused: HTTP 401: Unauthorized: unknown API key"
    )


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="the Debian 'prometheus' binary is not installed")
def test_a_real_prometheus_scrapes_the_counters(server, tmp_path):
    for _ in range(2):
        assert server.generate("b").status_code == 200
    expected = _samples(server)[
        ("conceptguard_requests_total", (("status", "200"), ("tenant", "b")))
    ]
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: conceptguard\n"
        f"    authorization: {{credentials: {METRICS_KEY}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.process.port}']}}]\n"
    )
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    query = 'sum(conceptguard_requests_total{tenant="b",status="200"})'
    value = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and value != expected:
            try:
                answer = requests.get(
                    f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5
                ).json()
                result = answer["data"]["result"]
                value = float(result[0]["value"][1]) if result else None
            except (requests.ConnectionError, ValueError, KeyError):
                pass
            if value != expected:
                time.sleep(0.5)  # polling interval only; the loop is bounded by the deadline
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    assert value == expected, f"prometheus read {value}, /metrics says {expected}"
