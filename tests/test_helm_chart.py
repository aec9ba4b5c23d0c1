"""The Helm chart renders offline (Helm's own engine through helm-python-sdk, no helm binary),
the committed renderings in helm/rendered/ are in sync with the templates and values, and
every manifest validates against the Kubernetes schemas of a current release.

kubernetes-validate ships no schemas for CRDs: the ServiceMonitor and the KEDA ScaledObject
are checked here field by field instead (see docs/DEPLOY.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate.utils")

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSIONS = ("1.31", "1.37")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}


def _load_render_module():
    spec = importlib.util.spec_from_file_location("helm_render", ROOT / "helm" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render_module()


@pytest.fixture(scope="module", params=sorted(render.VALUE_SETS))
def rendered(request) -> tuple[str, str]:
    return request.param, render.render(request.param)


def _documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


def test_committed_rendering_is_in_sync(rendered):
    name, text = rendered
    committed = ROOT / "helm" / "rendered" / f"{name}.yaml"
    assert committed.read_text() == text, f"{committed} is stale: run python helm/render.py"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates(rendered, version):
    docs = _documents(rendered[1])
    skipped = set()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            skipped.add(doc["kind"])
            continue
        # strict: unknown fields are errors too (a misspelt key would otherwise pass).
        kubernetes_validate.validate(doc, version, strict=True)
    kinds = {doc["kind"] for doc in docs} - skipped
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= kinds
    # A database registry needs no volume; every other value set claims one.
    assert ("PersistentVolumeClaim" in kinds) == (rendered[0] != "postgres")


def test_default_values_make_one_cpu_pod_on_a_read_write_once_registry():
    docs = _by_kind(_documents(render.render("default")))
    assert not {"HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor"} & set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert "runtimeClassName" not in pod
    assert container["args"][container["args"].index("--device") + 1] == "cpu"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    claim = volumes["registry"]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    # One pod by default: any cluster's default StorageClass serves it, and the pod may
    # create the registry itself.
    assert docs["Deployment"]["spec"]["replicas"] == 1
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert container["args"][container["args"].index("--registry-create") + 1] == "if-missing"
    assert container["envFrom"][0]["secretRef"]["name"] == docs["Secret"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_configmap_is_a_config_the_server_accepts(tmp_path):
    """The rendered config.yaml loads into server/config.py's ServerConfig, keys from the
    Secret's environment variables included."""
    from server.config import load_config

    for name in render.VALUE_SETS:
        docs = _by_kind(_documents(render.render(name)))
        config_file = tmp_path / f"{name}-config.yaml"
        config_file.write_text(docs["ConfigMap"]["data"]["config.yaml"])
        config = load_config(config_file, env=dict(docs["Secret"]["stringData"]))
        mount = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if name == "postgres":
            assert config.registry is None  # the URL comes from $CONCEPTGUARD_REGISTRY
        else:
            assert config.registry in {m["mountPath"] for m in mount}
        if name == "gpu-autoscaling":
            assert set(config.tenants) == {"acme", "globex"} and len(config.admin_keys) == 1


def test_gpu_and_keda_values():
    docs = _by_kind(_documents(render.render("gpu-autoscaling")))
    deployment = docs["Deployment"]["spec"]
    pod = deployment["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["runtimeClassName"] == "nvidia"
    assert container["args"][container["args"].index("--device") + 1] == "cuda"
    assert "replicas" not in deployment  # the autoscaler owns the replica count

    scaled = docs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert "conceptguard_queue_wait_seconds_sum" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0

    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["endpoints"][0] == {
        "port": "http",
        "path": "/metrics",
        "interval": "15s",
        # /metrics needs a key: Prometheus sends the scraper's from a Secret.
        "authorization": {
            "type": "Bearer",
            "credentials": {"name": "conceptguard-scraper", "key": "token"},
        },
    }
    secret = docs["Secret"]["stringData"]
    assert secret["CONCEPTGUARD_METRICS_KEY"].startswith("sha256:")
    service_labels = docs["Service"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= service_labels.items()


def test_hpa_scales_the_deployment_on_queued_requests():
    docs = _by_kind(_documents(render.render("hpa")))
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "conceptguard_queued_requests"


def test_schema_refuses_bad_values():
    import helm_python as helm

    with helm.Chart.load(str(render.CHART)) as chart:
        for bad in (
            {"serve": {"device": "tpu"}},
            {"apiKeys": {"admin": ["plain-key-not-a-hash"]}},
            {"autoscaling": {"mode": "sometimes"}},
            {"config": {"batching": {"max_batch_size": 0}}},
            {"registry": {"persistence": {"accessMode": "ReadOnlyMany"}}},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


KEYS = {"admin": ["sha256:" + "0" * 64]}
RWX = {"persistence": {"accessMode": "ReadWriteMany"}}


@pytest.mark.parametrize(
    ("values", "named"),
    [
        # Without shared keys every pod would invent its own run-only keys.
        ({"replicaCount": 2, "registry": RWX}, "/apiKeys"),
        ({"autoscaling": {"mode": "keda"}, "registry": RWX}, "/apiKeys"),
        # Several pods cannot share a ReadWriteOnce volume.
        ({"replicaCount": 2, "apiKeys": KEYS}, "/registry/persistence/accessMode"),
        ({"autoscaling": {"mode": "hpa"}, "apiKeys": KEYS}, "ReadWriteMany"),
    ],
)
def test_several_pods_need_shared_keys_and_a_read_write_many_registry(values, named):
    import helm_python as helm

    with helm.Chart.load(str(render.CHART)) as chart:
        with pytest.raises(helm.HelmValuesError, match=named):
            chart.validate_schema(values)
        # Each is enough once the other is there; a Secret reference stands for the keys,
        # and an existing claim's access mode is the user's.
        for fixed in (
            {**values, "apiKeys": KEYS, "registry": RWX},
            {**values, "apiKeys": {"existingSecret": "keys"}, "registry": RWX},
            {**values, "apiKeys": KEYS, "registry": {"persistence": {"existingClaim": "rwx"}}},
            # A database registry mounts no volume: its access mode does not matter.
            {**values, "apiKeys": KEYS, "registry": {"database": {"existingSecret": "db"}}},
        ):
            chart.validate_schema(fixed)


def test_a_database_registry_gets_its_url_from_a_secret_and_mounts_no_volume():
    docs = _documents(render.render("postgres"))
    kinds = {doc["kind"]: doc for doc in docs}
    assert "PersistentVolumeClaim" not in kinds
    deployment = kinds["Deployment"]["spec"]
    assert deployment["replicas"] == 3
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    (env,) = container["env"]
    assert env["name"] == "CONCEPTGUARD_REGISTRY"
    assert env["valueFrom"]["secretKeyRef"] == {"name": "conceptguard-registry-db", "key": "url"}
    assert "registry" not in {v["name"] for v in pod["volumes"]}
    assert "registry" not in {m["name"] for m in container["volumeMounts"]}
    assert container["args"][container["args"].index("--registry-create") + 1] == "never"
    # The config names no registry, so the server takes $CONCEPTGUARD_REGISTRY's URL.
    from server.config import load_config

    config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])
    assert "registry" not in config
    url = "postgresql://cg:secret@db.internal/conceptguard"
    assert load_config_text(kinds["ConfigMap"]["data"]["config.yaml"], url, load_config) == url
    # The install's Job creates the schema once, with the same URL.
    job = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["conceptguard", "registry", "init", "--exist-ok"]
    assert job["env"] == container["env"] and "volumeMounts" not in job


def load_config_text(text: str, url: str, load_config) -> str | None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        file.write(text)
        file.flush()
        return load_config(file.name, env={"CONCEPTGUARD_REGISTRY": url}).registry
