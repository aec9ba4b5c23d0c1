"""Compiled serving: torch.compile traces the denoiser once per batch bucket, and tenants and
patches that come and go compile nothing more.

A counting backend stands in for inductor: dynamo hands it every graph it traces (the count
is what a recompilation costs on a GPU), and it runs the traced graph as it is, so every
routed row must equal the eager router's row. Batches are padded to a power of two, so the
buckets here are 2, 4 and 8 forward rows (classifier-free guidance doubles the image rows).
"""

from __future__ import annotations

import pytest
import torch
from conftest import lora_patch
from test_denoiser_routing import conv_lora_patch, dense_patch
from test_skip_eraser import _eraser, _patch

from patches.loading import load_pipeline
from server.denoiser_routing import COMPILED_RANK, DenoiserRouter

PROMPT = "a red cat"
# The compiled forward pads its batch to a power of two, so the same row goes through GEMMs
# of another shape: float32 sums in another order, tens of ulps apart on latents of size ~4
# (1.4e-5 on one CPU, under 1e-5 on another). A row routed to the wrong stack differs by
# over 1e-2 (each test checks its mixes differ that much).
TOLERANCE = 1e-4


class CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph.forward


@pytest.fixture
def pipe(sd_model_path):
    """A pipeline of its own: compiling replaces its U-Net's forward."""
    torch._dynamo.reset()  # dynamo caches per code object, across pipelines
    pipe = load_pipeline(sd_model_path)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch._dynamo.reset()


def _latents(pipe, router: DenoiserRouter, mix: list) -> torch.Tensor:
    stacks = [None if patches is None else router.prepare(patches) for patches in mix]
    with router.routing(stacks):
        return pipe(
            [PROMPT] * len(mix),
            num_inference_steps=2,
            height=64,
            width=64,
            guidance_scale=4.0,
            generator=[torch.Generator().manual_seed(i) for i in range(len(mix))],
            output_type="latent",
        ).images


def _eager(pipe, mixes: list[list]) -> list[torch.Tensor]:
    """The eager router's latents, computed before anything is compiled (afterwards the
    eager router's calls would go through the compiled forward too)."""
    router = DenoiserRouter(pipe)
    return [_latents(pipe, router, mix) for mix in mixes]


def _compiled(pipe) -> tuple[DenoiserRouter, CountingBackend]:
    router, backend = DenoiserRouter(pipe), CountingBackend()
    router.compile(backend=backend)
    return router, backend


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max().item() <= TOLERANCE


def test_tenants_and_patches_change_without_compiling(pipe):
    a, b, c = lora_patch(pipe, 1), lora_patch(pipe, 2), lora_patch(pipe, 3)
    dense = dense_patch(pipe, 4)  # a closed-form edit, factored into the same layers' slots
    mixes = [
        [[a], None],  # 4 forward rows
        [[b], [a], [c]],  # 6 -> bucket 8
        [None, None],  # nobody's denoiser is patched: the eager router adds no hook at all
        [[a, b]],  # 2
        [[c], None, [b], [a]],  # 8
        [[dense], [a, dense]],
    ]
    d = lora_patch(pipe, 5, rank=3)
    later = [[[d], [a]], [[d, c], None, [b]], [None], [[a], [d], [dense], None]]
    expected = _eager(pipe, mixes + later)
    assert (expected[0][0] - expected[2][0]).abs().max() > 1e-2  # the stacks matter

    router, backend = _compiled(pipe)
    for mix, want in zip(mixes, expected, strict=False):
        _check(_latents(pipe, router, mix), want)
    assert backend.graphs == 3  # one per bucket: 2, 4, 8 (stacks up to rank 16 fit)

    # Stacks released, a new patch on the same layers, the same tenants in new mixes.
    router.release_unused(set())
    for mix, want in zip(later, expected[len(mixes) :], strict=True):
        _check(_latents(pipe, router, mix), want)
    assert backend.graphs == 3


def test_slots_that_grow_retrace_once_per_bucket(pipe):
    a, conv = lora_patch(pipe, 1), conv_lora_patch(pipe, 2)
    wide = lora_patch(pipe, 3, rank=COMPILED_RANK + 1)  # past the compiled rank bucket
    new_layers = [[[conv], [a]], [[a], None], [[conv, a], [conv]]]
    wider = [[[wide], [a]], [[a], None], [[conv], [wide]]]
    expected = _eager(pipe, new_layers + wider)
    assert (expected[0][0] - expected[2][0]).abs().max() > 1e-2  # [conv] vs [conv, a], seed 0
    assert (expected[1][0] - expected[3][0]).abs().max() > 1e-2  # [a] vs [wide], seed 0
    router, backend = _compiled(pipe)
    _latents(pipe, router, [[a], None])
    assert backend.graphs == 1
    # conv_in and a ResNet's convolutions were never adapted: their hooks join the graph.
    for mix, want in zip(new_layers, expected, strict=False):
        _check(_latents(pipe, router, mix), want)
    assert backend.graphs == 2
    # A stack of larger rank doubles its layers' slots: once more, then never again.
    for mix, want in zip(wider, expected[len(new_layers) :], strict=True):
        _check(_latents(pipe, router, mix), want)
    assert backend.graphs == 3
    router.release_unused(set())  # the layers stay (zeros): nothing to retrace
    _latents(pipe, router, [[a], None])
    assert backend.graphs == 3


def test_routed_modules_keep_the_graph(pipe):
    config = {"width": 0.5, "buckets": 4, "gate_tokens": 4}
    dumo = _patch(pipe, _eraser(pipe, config), config)
    a = lora_patch(pipe, 1)
    mixes = [[[dumo], [a]], [[a], None], [[dumo], None], [[a, dumo], [dumo]]]
    expected = _eager(pipe, mixes)
    assert (expected[0][0] - expected[1][1]).abs().max() > 1e-2
    router, backend = _compiled(pipe)
    for mix, want in zip(mixes, expected, strict=True):
        _check(_latents(pipe, router, mix), want)
    # With and without the routed modules' residuals: two graphs, then no more.
    assert backend.graphs == 2
    for mix, want in zip(mixes, expected, strict=True):
        _check(_latents(pipe, router, mix), want)
    assert backend.graphs == 2
