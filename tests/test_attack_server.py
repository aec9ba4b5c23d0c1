"""`conceptguard attack --server`: the black-box attacks run through a real server's
generation API with a tenant key, against that tenant's own stack, and see what the same
stack applied offline shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tenant_server import TENANT_KEYS, start_tenant_server

from conceptguard.cli import main
from patches.registry import open_registry

MODEL = Path(__file__).resolve().parents[1] / "models" / "minicanvas"
SMALL = [
    "--model", str(MODEL), "--concept", "circle", "--seeds", "2", "--steps", "8",
    "--attacks", "paraphrase,ring-a-bell",
    "--para-contexts", "1",
    "--rab-generations", "2", "--rab-population", "8", "--rab-contexts", "2",
    # One search, sent unchecked: the prompts sent over HTTP and offline must be the same.
    "--rab-restarts", "1", "--rab-probes", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from bench.minicanvas.erasure_settings import hirm_config
    from erasure.hirm import erase_hirm

    folder = tmp_path_factory.mktemp("attack-server")
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    patch = erase_hirm(pipe, hirm_config(["circle"], "S", retain=False, steps=10)).patches[0]
    path = folder / "circle.safetensors"
    patch.save(path)
    registry = open_registry(folder / "registry")
    registry.set_tenant("a", [registry.put_patch(patch.to_bytes()).id])
    server = start_tenant_server(folder, MODEL, workers=1)
    try:
        yield server, path, patch.id
    finally:
        server.process.stop()


def test_black_box_attacks_through_the_api_attack_the_tenants_stack(served, tmp_path):
    server, path, patch_id = served
    remote, local = tmp_path / "remote.json", tmp_path / "local.json"
    key = ["--server", server.url, "--key", TENANT_KEYS["a"], "--tenant", "a"]
    assert main(["attack", *SMALL, *key, "--json", str(remote)]) == 0
    assert main(["attack", *SMALL, "--patch", str(path), "--json", str(local)]) == 0
    over_http, offline = (json.loads(p.read_text()) for p in (remote, local))
    generation = over_http["config"]["generation"]
    assert generation["where"] == "server" and generation["tenants"] == ["a"]
    assert generation["stacks"] == [[patch_id]]
    for name in ("paraphrase", "ring-a-bell"):
        sent = over_http["attacks"][name]["attempt_records"]
        here = offline["attacks"][name]["attempt_records"]
        assert [a["prompt"] for a in sent] == [a["prompt"] for a in here]
        verdicts = [(a["recognised"], b["recognised"]) for a, b in zip(sent, here, strict=True)]
        same = sum(x == y for a, b in verdicts for x, y in zip(a, b, strict=True))
        assert same >= 0.9 * 2 * len(verdicts), name


def test_a_key_of_another_tenant_is_refused(served, capsys):
    server, _, _ = served
    key = ["--server", server.url, "--key", TENANT_KEYS["b"], "--tenant", "a"]
    assert main(["attack", *SMALL, *key, "--attacks", "random-tokens"]) == 2
    assert "tenant b, not a" in capsys.readouterr().err
