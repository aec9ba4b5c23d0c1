"""The per-row denoiser: a batch mixing tenants' denoiser stacks runs ONE denoiser call per
diffusion step, and every row equals its stack applied offline with `Patch.apply`.

Tolerance: images are compared as floats in [0, 1] to 1e-4. The routed path adds each
row's B (A x) after the base layer, with a stack's factors concatenated into one adapter;
peft adds one adapter after another, and a dense edit applied offline is folded into the
weight. The same sums in another order, plus a row subset's CPU kernels, differ by rounding
only (measured <= 2e-6); a wrong or missing stack moves pixels by 1e-2 or more (asserted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from conftest import lora_patch, unet_weights_patch

from patches.errors import WrongTarget
from patches.patch import Patch
from patches.targets import denoiser_component
from patches.unet_modules import (
    MODULE_TYPES,
    SkipModule,
    SkipResiduals,
    UnetModuleType,
    register_module_type,
)
from server.denoiser_routing import DenoiserRouter

PROMPT = "a red cat"
STEPS = 3
TOLERANCE = 1e-4


def _call(pipe, prompts: list[str], seeds: list[int]) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 32} if type(pipe).__name__.startswith("Flux") else {}
    return pipe(
        prompts,
        num_inference_steps=STEPS,
        height=64,
        width=64,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
        **extra,
    ).images


def offline(pipe, stack: list[Patch], seed: int) -> np.ndarray:
    for patch in stack:
        patch.apply(pipe)
    try:
        return _call(pipe, [PROMPT], [seed])[0]
    finally:
        for patch in reversed(stack):
            patch.remove(pipe)


def routed(pipe, router: DenoiserRouter, stacks: list[list[Patch]]):
    prepared = [router.prepare(stack) for stack in stacks]
    seeds = list(range(1, len(stacks) + 1))
    with router.routing(prepared) as passed:
        images = _call(pipe, [PROMPT] * len(stacks), seeds)
    return images, passed


def dense_patch(pipe, seed: int, rank: int = 2, mode: str = "override") -> Patch:
    """A closed-form-shaped edit: a rank-`rank` change of the first cross-attention key
    projection's weight, stored dense (override or delta)."""
    component = denoiser_component(pipe)
    denoiser = getattr(pipe, component)
    name = next(
        n
        for n, _ in denoiser.named_parameters()
        if n.endswith(("attn2.to_k.weight", "attn.to_k.weight"))
    )
    weight = dict(denoiser.named_parameters())[name].detach()
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(weight.shape[0], rank, generator=generator)
    v = torch.randn(rank, weight.shape[1], generator=generator)
    delta = 0.2 * u @ v / weight.shape[1] ** 0.5
    return Patch.create(
        pipe=pipe,
        kind="unet_weights",
        component=component,
        method="test-dense",
        concepts=[f"dense{seed}"],
        tensors={name: delta if mode == "delta" else weight + delta},
        mode=mode,
    )


def conv_lora_patch(pipe, seed: int, rank: int = 2) -> Patch:
    """A unet_lora patch on 3x3 convolutions (conv_in and the first ResNet's convs)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if name == "conv_in" or name.startswith("down_blocks.0.resnets.0.conv"):
            kernel = module.kernel_size
            a = 0.2 * torch.randn(rank, module.in_channels, *kernel, generator=generator)
            b = 0.2 * torch.randn(module.out_channels, rank, 1, 1, generator=generator)
            tensors[f"unet.{name}.lora_A.weight"] = a
            tensors[f"unet.{name}.lora_B.weight"] = b
    return Patch.create(
        pipe=pipe,
        kind="unet_lora",
        component="unet",
        method="test-conv-lora",
        concepts=[f"conv{seed}"],
        tensors=tensors,
    )


def assert_matches(images: np.ndarray, expected: list[np.ndarray]) -> None:
    for row, (got, want) in enumerate(zip(images, expected, strict=True)):
        assert np.abs(got - want).max() <= TOLERANCE, (row, np.abs(got - want).max())


def assert_distinct(expected: list[np.ndarray]) -> None:
    """The stacks really differ for this prompt, so equality above means something."""
    for i in range(len(expected)):
        for j in range(i + 1, len(expected)):
            assert np.abs(expected[i] - expected[j]).max() > 1e-2, (i, j)


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_a_mixed_batch_equals_each_stack_applied_offline(family, request):
    pipe = request.getfixturevalue(f"tiny_{family}")
    first, second = lora_patch(pipe, seed=1, rank=4), lora_patch(pipe, seed=2, rank=2)
    stacks = [
        [first],
        [],  # a tenant with no denoiser patch
        [first, second],  # two LoRAs: one adapter of rank 6
        [dense_patch(pipe, seed=3), second],  # a dense edit, factored exactly, and a LoRA
        [dense_patch(pipe, seed=4, mode="delta")],
    ]
    if family != "flux":
        stacks.append([conv_lora_patch(pipe, seed=5), unet_weights_patch(pipe, seed=6)])
    expected = [offline(pipe, stack, seed) for seed, stack in enumerate(stacks, 1)]
    assert_distinct(expected)
    router = DenoiserRouter(pipe)
    images, passed = routed(pipe, router, stacks)
    assert_matches(images, expected)
    assert passed.calls == STEPS  # one denoiser forward per step for the whole batch
    # The row with no patch gets exactly the base output of the same batch.
    base = DenoiserRouter(pipe)
    with base.routing([None] * len(stacks)) as plain:
        unpatched = _call(pipe, [PROMPT] * len(stacks), list(range(1, len(stacks) + 1)))
    assert plain.calls == STEPS and plain.adapted_layers == 0
    assert np.array_equal(images[1], unpatched[1])
    # Nothing of the routing is left on the shared denoiser.
    assert not getattr(pipe, denoiser_component(pipe))._forward_hooks
    assert not getattr(pipe, denoiser_component(pipe))._forward_pre_hooks


def test_minicanvas_mixed_batch_equals_patch_apply():
    from patches.loading import load_pipeline
    from server.default_model import default_model_path

    pipe = load_pipeline(str(default_model_path()), "float32")
    stacks = [
        [lora_patch(pipe, seed=11, rank=1)],
        [lora_patch(pipe, seed=12, rank=4), dense_patch(pipe, seed=13)],
        [],
        [lora_patch(pipe, seed=11, rank=1), lora_patch(pipe, seed=14, rank=2)],
    ]

    def call(prompts, seeds):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompts,
            num_inference_steps=STEPS,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        ).images

    expected = []
    for seed, stack in enumerate(stacks, 1):
        for patch in stack:
            patch.apply(pipe)
        try:
            expected.append(call([PROMPT], [seed])[0])
        finally:
            for patch in reversed(stack):
                patch.remove(pipe)
    assert_distinct(expected)
    router = DenoiserRouter(pipe)
    prepared = [router.prepare(stack) for stack in stacks]
    with router.routing(prepared) as passed:
        images = call([PROMPT] * len(stacks), list(range(1, len(stacks) + 1)))
    assert_matches(images, expected)
    assert passed.calls == STEPS


def test_slots_grow_and_release_without_changing_any_row(models_dir):
    from bench.tiny_pipelines import tiny_pipeline

    pipe = tiny_pipeline("sd", models_dir, seed=0)
    router = DenoiserRouter(pipe, capacity=2)  # slot 0 (zeros) and one more: growth at once
    low = lora_patch(pipe, seed=21, rank=1)
    before, _ = routed(pipe, router, [[low], []])
    many = [[lora_patch(pipe, seed=30 + i, rank=1)] for i in range(4)]
    high = lora_patch(pipe, seed=22, rank=8)  # grows the rank bucket of the same layers
    images, _ = routed(pipe, router, [[low], [], [high], *many])
    assert router.capacity == 8 and len(router.prepared) == 6
    layer = next(iter(router.layers.values()))
    assert layer.rank == 8
    assert np.abs(images[0] - before[0]).max() <= TOLERANCE
    memory = router.memory()
    assert memory["bytes"] == memory["bytes_per_slot"] * 8 > 0

    stale = router.prepare([high])
    kept = {(low.id,)}
    assert sorted(router.release_unused(kept)) == sorted([(high.id,), *[(p[0].id,) for p in many]])
    assert router.prepared == [(low.id,)]
    with pytest.raises(RuntimeError, match="no longer prepared"), router.routing([stale]):
        pass
    # The freed slots hold zeros again: reusing one gives its new stack only.
    other = lora_patch(pipe, seed=23, rank=2)
    images, _ = routed(pipe, router, [[other]])
    assert np.abs(images[0] - offline(pipe, [other], 1)).max() <= TOLERANCE
    router.release_unused(set())
    assert router.layers == {} and router.prepared == []


def test_a_pipeline_whose_layers_peft_wrapped_is_routed_the_same(models_dir, tmp_path):
    from bench.tiny_pipelines import tiny_pipeline

    pipe = tiny_pipeline("sd", models_dir, seed=0)
    first, second = lora_patch(pipe, seed=51), lora_patch(pipe, seed=52)
    expected = offline(pipe, [second], 1)
    first.save(tmp_path / "first.safetensors")
    pipe.load_lora_weights(str(tmp_path / "first.safetensors"), adapter_name="left")
    pipe.delete_adapters("left")  # peft's wrappers stay, with no adapter in them
    images, _ = routed(pipe, DenoiserRouter(pipe), [[second]])
    assert np.abs(images[0] - expected).max() <= TOLERANCE


def test_what_per_row_serving_cannot_take_is_refused(models_dir):
    from bench.tiny_pipelines import tiny_pipeline

    pipe = tiny_pipeline("sd", models_dir, seed=0)
    router = DenoiserRouter(pipe, max_rank=4)
    with pytest.raises(WrongTarget, match="rank 6"):
        router.prepare([lora_patch(pipe, seed=1, rank=4), lora_patch(pipe, seed=2, rank=2)])
    with pytest.raises(WrongTarget, match="has rank 32"):
        router.prepare([unet_weights_patch(pipe)])  # a full-rank dense edit of conv_in
    bias = "conv_in.bias"
    value = dict(pipe.unet.named_parameters())[bias].detach() + 0.1
    bias_patch = Patch.create(
        pipe=pipe,
        kind="unet_weights",
        component="unet",
        method="test",
        concepts=["bias"],
        tensors={bias: value},
    )
    with pytest.raises(WrongTarget, match="weights only"):
        router.prepare([bias_patch])
    assert router.prepared == [] and router.layers == {}


# --- routed modules: a small module type, registered by this test -------------------------


class _ChannelShift(SkipModule):
    """Adds a learned per-channel shift to every skip, scaled by the row's mean text state
    (so each row's output depends on its own inputs)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], factors: list[int]):
        super().__init__()
        count = len(factors)
        self.down = torch.nn.ParameterList(tensors[f"module.down.{i}"] for i in range(count))
        self.mid = torch.nn.Parameter(tensors["module.mid"])
        self.factors = factors
        self.rows_seen: list[int] = []

    def forward(self, sample, timestep, encoder_hidden_states) -> SkipResiduals:
        self.rows_seen.append(sample.shape[0])
        scale = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        height, width = sample.shape[-2:]

        def shift(bias: torch.Tensor, factor: int) -> torch.Tensor:
            size = (sample.shape[0], bias.shape[0], height // factor, width // factor)
            return (scale * bias.view(1, -1, 1, 1)).expand(size)

        down = tuple(shift(b, f) for b, f in zip(self.down, self.factors, strict=True))
        return SkipResiduals(down, shift(self.mid, self.factors[-1]))


class _ChannelShiftType(UnetModuleType):
    name = "test_channel_shift"

    def expected_shapes(self, config, unet):
        channels = config["channels"]
        if unet.parameters["conv_in.weight"][0] != channels[0]:
            raise WrongTarget("channels do not fit this U-Net")
        shapes = {f"module.down.{i}": (c,) for i, c in enumerate(channels)}
        return {**shapes, "module.mid": (config["mid"],)}

    def build(self, config, tensors, unet) -> SkipModule:
        return _ChannelShift(tensors, config["factors"])


@pytest.fixture
def channel_shift_type():
    register_module_type(_ChannelShiftType())
    yield
    MODULE_TYPES.pop(_ChannelShiftType.name)


def _skip_layout(pipe) -> dict[str, Any]:
    """Channels and downsampling factor of each skip of the U-Net, read off one forward."""
    unet = pipe.unet
    skips: list[torch.Size] = []
    mid: list[torch.Size] = []

    def down_skips(module, args, out):
        skips.extend(t.shape for t in out[1])

    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: skips.append(out.shape))]
    hooks += [block.register_forward_hook(down_skips) for block in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: mid.append(out.shape)))
    states = torch.zeros(1, 77, unet.config.cross_attention_dim)
    try:
        with torch.no_grad():
            unet(torch.zeros(1, unet.config.in_channels, 8, 8), 1, encoder_hidden_states=states)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "channels": [s[1] for s in skips],
        "factors": [8 // s[-1] for s in skips],
        "mid": mid[0][1],
    }


def _module_patch(pipe, layout: dict[str, Any], seed: int) -> Patch:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"module.down.{i}": torch.randn(c, generator=generator)
        for i, c in enumerate(layout["channels"])
    }
    tensors["module.mid"] = torch.randn(layout["mid"], generator=generator)
    return Patch.create(
        pipe=pipe,
        kind="unet_module",
        component="unet",
        method="test-module",
        concepts=[f"module{seed}"],
        tensors=tensors,
        params={"module_type": _ChannelShiftType.name, "module_config": layout},
    )


def test_routed_modules_run_only_on_their_rows(models_dir, channel_shift_type):
    from bench.tiny_pipelines import tiny_pipeline

    pipe = tiny_pipeline("sd", models_dir, seed=0)
    layout = _skip_layout(pipe)
    one, two = _module_patch(pipe, layout, seed=41), _module_patch(pipe, layout, seed=42)
    lora = lora_patch(pipe, seed=43)
    stacks = [[one], [], [one, two], [lora, one], []]
    expected = [offline(pipe, stack, seed) for seed, stack in enumerate(stacks, 1)]
    assert_distinct(expected)
    router = DenoiserRouter(pipe)
    prepared = [router.prepare(stack) for stack in stacks]
    images, passed = routed(pipe, router, stacks)
    assert_matches(images, expected)
    assert passed.calls == STEPS and passed.routed_modules == 4
    # Each module saw only its own rows, both halves of classifier-free guidance: 2 x 1 row.
    for stack in prepared:
        for module in stack.modules if stack else ():
            assert module.rows_seen == [2] * STEPS


def test_an_unknown_module_type_is_refused(tiny_sd, channel_shift_type):
    layout = _skip_layout(tiny_sd)
    patch = _module_patch(tiny_sd, layout, seed=1)
    MODULE_TYPES.pop(_ChannelShiftType.name)
    try:
        with pytest.raises(WrongTarget, match="test_channel_shift"):
            patch.verify(tiny_sd)
        with pytest.raises(WrongTarget, match="test_channel_shift"):
            DenoiserRouter(tiny_sd).prepare([patch])
    finally:
        register_module_type(_ChannelShiftType())
