"""The OpenAPI document is the API as it is: every route is in it with every status it
answers, and schemathesis, run against a live `conceptguard serve` from the server's own
`/openapi.json` with every kind of key, finds no server error and no answer the document does
not describe (status, media type, headers, body schema), for valid and invalid requests."""

from __future__ import annotations

import pytest
import requests
from tenant_server import ADMIN_KEY, METRICS_KEY, TENANT_KEYS, start_tenant_server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

# Examples per operation, per generation mode and key kind: 16 operations x 2 x 5 kinds.
EXAMPLES = 6
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,
]
KEYS = {
    "tenant": TENANT_KEYS["a"],
    "admin": ADMIN_KEY,
    "metrics": METRICS_KEY,
    "unknown": "not-a-key",
    "none": None,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd_model_path):
    # Small bounds: the valid generation requests schemathesis makes stay cheap on a CPU.
    running = start_tenant_server(
        tmp_path_factory.mktemp("openapi"),
        sd_model_path,
        workers=1,
        limits={"max_steps": 2, "default_steps": 2, "max_images": 2, "max_image_steps": 8},
        max_patch_bytes=64_000,
    )
    yield running
    running.process.stop()


def _app_routes(tiny_sd, tmp_path) -> set[tuple[str, str]]:
    """(method, path) of every route the server's app has, built here as `serve` builds it."""
    from fastapi.routing import APIRoute

    from patches.signature import ModelSignature
    from server.app import build_server
    from server.config import ServerConfig
    from server.generation_api import ModelSettings

    built = build_server(
        ModelSettings("tiny-sd"),
        ServerConfig(),
        str(tmp_path / "r"),
        ModelSignature.of(tiny_sd),
        1,
        64,
    )
    return {
        (method.lower(), route.path_format)
        for route in built.app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }


def test_every_route_is_documented_with_its_errors_and_keys(server, tiny_sd, tmp_path):
    response = requests.get(server.url + "/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    document = response.json()
    documented = {(m, path) for path, ops in document["paths"].items() for m in ops}
    assert documented == _app_routes(tiny_sd, tmp_path)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for (method, path), op in ((k, document["paths"][k[1]][k[0]]) for k in documented):
        statuses = set(op["responses"])
        assert "500" in statuses, (method, path)
        if path in ("/", "/health"):
            assert "security" not in op
            assert "text/plain" in op["responses"]["200"]["content"]
            continue
        assert op["security"] == [{"bearer": []}], (method, path)
        assert {"401", "403"} <= statuses, (method, path)
    generation = document["paths"]["/v1/images/generations"]["post"]
    assert {"200", "400", "408", "413", "429", "500", "503", "504"} <= set(generation["responses"])
    assert generation["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    request = document["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert request["n"]["anyOf"][0]["maximum"] == 2  # this server's limits.max_images
    assert "jpeg" in request["output_format"]["anyOf"][0]["enum"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    # /docs is Swagger UI over this document.
    docs = requests.get(server.url + "/docs", timeout=30)
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def _fuzz(url: str, operation, mode: GenerationMode, headers: dict, checks: list) -> None:
    """EXAMPLES generated requests to `operation`, each answer checked against the document."""

    @given(case=operation.as_strategy(generation_mode=mode, headers=headers))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case):
        case.call_and_validate(base_url=url, headers=headers, checks=checks, timeout=120)

    try:
        call()
    except Unsatisfiable:
        # Nothing of it can be made invalid (a path parameter that takes any text).
        assert mode.is_negative, operation.label


@pytest.mark.parametrize("kind", KEYS)
def test_schemathesis_with_every_key_kind(server, kind):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    key = KEYS[kind]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    checks = [*CHECKS, ignored_auth] if key in (ADMIN_KEY, TENANT_KEYS["a"]) else CHECKS
    for result in schema.get_all_operations():
        operation = result.ok()
        _fuzz(server.url, operation, GenerationMode.POSITIVE, headers, checks)
        if len(operation.path_parameters) + len(operation.query) + len(operation.body):
            # Invalid data needs something to make invalid (/, /health, lists have nothing).
            negative = [*checks, negative_data_rejection]
            _fuzz(server.url, operation, GenerationMode.NEGATIVE, headers, negative)
