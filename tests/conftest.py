"""Shared fixtures: tiny real pipelines (saved and loaded back) and real patch files."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread, here and in every CLI subprocess: on two shared cores, torch's default of one
# thread per core spin-waits against the other processes (server workers, a busy CI host)
# and runs training-shaped tests 10x slower or worse; tiny models gain nothing from two.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from bench.tiny_pipelines import save_tiny_pipeline, tiny_pipeline
from patches.patch import Patch
from patches.targets import block_parameter_names

torch.set_num_threads(1)

# The README's test command runs whole files on every core (-n auto --dist loadfile); a
# long file handed out last keeps the run waiting for one worker, so the longest files
# (measured with --durations on two cores, 2026-12-01) start first. Others keep their order.
# xdist would re-sort files by their number of tests: the command turns that off
# (--no-loadscope-reorder); with it the 4.5-minute gpu-suite test started last.
LONGEST_FIRST = (
    "test_gpu_suite.py",
    "test_erase_defaults.py",
    "test_erasure_scores.py",
    "test_serve.py",
    "test_minicanvas_model.py",
    "test_pg_registry.py",
    "test_server.py",
    "test_registry.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def sd_model_path(models_dir):
    path = models_dir / "tiny-sd-seed0"
    if not (path / "model_index.json").exists():
        save_tiny_pipeline("sd", path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sd(models_dir, sd_model_path):
    return tiny_pipeline("sd", models_dir, seed=0)


@pytest.fixture(scope="session")
def other_sd(models_dir):
    """Same architecture, other weights: a different base."""
    return tiny_pipeline("sd", models_dir, seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl(models_dir):
    return tiny_pipeline("sdxl", models_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_flux(models_dir):
    return tiny_pipeline("flux", models_dir, seed=0)


def text_encoder_patch(
    pipe,
    seed: int = 0,
    component: str = "text_encoder",
    mode: str = "override",
    scale=0.05,
    patch_name: str | None = None,
) -> Patch:
    """A real text_encoder patch: block 0 moved by seeded noise."""
    encoder = getattr(pipe, component)
    params = dict(encoder.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in block_parameter_names(encoder, [0]):
        noise = scale * torch.randn(params[name].shape, generator=generator)
        tensors[name] = noise if mode == "delta" else params[name].detach() + noise
    return Patch.create(
        pipe=pipe,
        kind="text_encoder",
        component=component,
        method="test",
        concepts=[f"concept{seed}"],
        tensors=tensors,
        mode=mode,
        name=patch_name,
    )


def unet_weights_patch(pipe, seed: int = 0) -> Patch:
    """A real unet_weights patch: one U-Net conv nudged (a full-rank dense edit, rank 32)."""
    name = "conv_in.weight"
    weight = dict(pipe.unet.named_parameters())[name].detach()
    noise = 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return Patch.create(
        pipe=pipe,
        kind="unet_weights",
        component="unet",
        method="test-weights",
        concepts=[f"concept{seed}"],
        tensors={name: weight + noise},
    )


def lora_patch(pipe, seed: int = 0, rank: int = 4) -> Patch:
    """A real unet_lora patch on every cross-attention key/value projection."""
    component = "transformer" if hasattr(pipe, "transformer") else "unet"
    denoiser = getattr(pipe, component)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in denoiser.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v", "attn.to_k", "attn.to_v")):
            a = 0.1 * torch.randn(rank, module.in_features, generator=generator)
            b = 0.1 * torch.randn(module.out_features, rank, generator=generator)
            tensors[f"{component}.{name}.lora_A.weight"] = a
            tensors[f"{component}.{name}.lora_B.weight"] = b
    return Patch.create(
        pipe=pipe,
        kind="unet_lora",
        component=component,
        method="test-lora",
        concepts=[f"concept{seed}"],
        tensors=tensors,
    )


@pytest.fixture(scope="session")
def make_patch_bytes(tiny_sd):
    """Factory: distinct, valid patch files (bytes) for the tiny SD pipeline."""

    def make(i: int) -> bytes:
        return text_encoder_patch(tiny_sd, seed=i).to_bytes()

    return make


def run_conceptguard(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The `conceptguard` CLI in a real subprocess, offline, with its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "conceptguard.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def wait_for_builds(runtime, timeout: float = 30.0) -> None:
    """Until the stack builds a PatchRuntime has in flight are done (bounded): waits on the
    builds themselves, no polling."""
    runtime.await_builds(runtime.stacks_in_build, timeout)
    assert runtime.build_finished


def generate(pipe, prompt: str = "a red circle", seed: int = 0, **kwargs):
    """Deterministic tiny generation as a numpy array."""
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 32} if type(pipe).__name__.startswith("Flux") else {}
    return pipe(
        prompt,
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **extra,
        **kwargs,
    ).images
