"""`bench gpu-suite --tiny`: the GPU benchmark suite runs end to end on the CPU (its figures
mean nothing here; it proves the command a GPU session runs is ready)."""

from __future__ import annotations

import json

from conftest import run_conceptguard


def test_the_gpu_suite_runs_on_the_cpu_with_a_tiny_configuration(tmp_path):
    out = tmp_path / "suite"
    proc = run_conceptguard("bench", "gpu-suite", "--tiny", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["tiny"] is True
    assert {name: run["exit"] for name, run in result["runs"].items()} == {
        "mixed_stacks": 0,
        "serve_throughput": 0,
        "serve_throughput_compiled": 0,
        "hirm_cost": 0,
        "closed_form_cost": 0,
    }
    # The compiled run served through `serve --compile` (traced with dynamo's eager backend).
    compiled = json.loads((out / "serve_throughput_compiled.json").read_text())
    assert compiled["compile"] == "default"
    figures = result["figures"]
    for name in ("plain_diffusers_images_per_s", "server_16_tenants_images_per_s",
                 "ratio_16_over_1", "ratio_b_over_a", "hirm_seconds",
                 "plain_compiled_images_per_s", "server_compiled_16_tenants_images_per_s",
                 "server_over_plain_compiled", "hirm_compressed_mb",
                 "uce_seconds", "erasepro_seconds"):  # fmt: skip
        assert figures[name] is not None and figures[name] > 0, name
    assert len(result["checks"]) == 6 and all(c["met"] is not None for c in result["checks"])
    assert "these figures mean nothing" in proc.stdout
