"""The dumo_epr module type: shapes from the served U-Net, prior-knowledge initialisation,
the prompt gate, TLMO, and per-row serving equal to `Patch.apply`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patches.errors import PatchIncompatible, WrongTarget
from patches.patch import Patch
from patches.skip_eraser import SkipEraser, concept_similarity, initialised_from
from server.denoiser_routing import DenoiserRouter

PROMPTS = ["a red cat", "a blue square"]


def _call(pipe, prompts, seeds) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompts,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images


def _states(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def _eraser(pipe, config: dict, seed: int = 0, strength: float = 0.3) -> SkipEraser:
    module = initialised_from(pipe.unet, SkipEraser(dict(pipe.unet.config), config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*module.skip_outs, module.mid_out]:
            conv.weight.normal_(0, strength, generator=generator)
        module.tlmo.uniform_(0.5, 1.5, generator=generator)
    return module


def _patch(pipe, module: SkipEraser, config: dict) -> Patch:
    return Patch.create(
        pipe=pipe,
        kind="unet_module",
        component="unet",
        method="dumo",
        concepts=["cat"],
        tensors=module.state_tensors(),
        params={"module_type": "dumo_epr", "module_config": config},
    )


def _offline(pipe, patch: Patch | None, prompt: str, seed: int) -> np.ndarray:
    if patch is not None:
        patch.apply(pipe)
    try:
        return _call(pipe, [prompt], [seed])[0]
    finally:
        if patch is not None:
            patch.remove(pipe)


def test_a_fresh_eraser_changes_nothing(tiny_sd):
    config = {"width": 1.0, "buckets": 4}
    module = initialised_from(tiny_sd.unet, SkipEraser(dict(tiny_sd.unet.config), config))
    # Prior knowledge: the encoder starts as the U-Net's own down path and mid block.
    assert torch.equal(module.conv_in.weight, tiny_sd.unet.conv_in.weight)
    patch = Patch.from_bytes(_patch(tiny_sd, module, config).to_bytes())
    patch.verify(tiny_sd)
    assert np.array_equal(
        _offline(tiny_sd, patch, PROMPTS[0], 1), _offline(tiny_sd, None, PROMPTS[0], 1)
    )


def test_the_gate_routes_by_prompt_and_serving_equals_patch_apply(tiny_sd):
    config = {"width": 0.5, "buckets": 4, "gate_tokens": 4}
    module = _eraser(tiny_sd, config)
    cat, square = _states(tiny_sd, PROMPTS[0]), _states(tiny_sd, PROMPTS[1])
    with torch.no_grad():
        module.gate_target.copy_(cat[0, 1:5])  # the concept's token states
    near = float(concept_similarity(cat, module.gate_target))
    far = float(concept_similarity(square, module.gate_target))
    assert near > far
    config["gate"] = {"low": far, "high": (near + far) / 2}
    patch = _patch(tiny_sd, module, config)
    served = DenoiserRouter(tiny_sd).prepare([patch]).modules[0]
    gates = served.gate(torch.cat([cat, square]))
    assert gates.tolist() == [1.0, 0.0]
    # The gated-off prompt is left exactly as the base draws it.
    assert np.array_equal(
        _offline(tiny_sd, patch, PROMPTS[1], 2), _offline(tiny_sd, None, PROMPTS[1], 2)
    )
    expected = [_offline(tiny_sd, patch, p, s) for s, p in enumerate(PROMPTS, 1)]
    assert np.abs(expected[0] - _offline(tiny_sd, None, PROMPTS[0], 1)).max() > 1e-2
    router = DenoiserRouter(tiny_sd)
    stack = router.prepare([patch])
    with router.routing([stack, stack, None]) as passed:
        images = _call(tiny_sd, [*PROMPTS, PROMPTS[0]], [1, 2, 3])
    assert passed.calls == 3 and passed.routed_modules == 1
    for got, want in zip(images, [*expected, _offline(tiny_sd, None, PROMPTS[0], 3)], strict=True):
        assert np.abs(got - want).max() <= 1e-4


def test_tlmo_scales_each_output_by_timestep_bucket(tiny_sd):
    module = _eraser(tiny_sd, {"width": 0.5, "buckets": 4})
    with torch.no_grad():
        module.tlmo.copy_(torch.arange(4 * module.outputs, dtype=torch.float32).view(4, -1))
    states = _states(tiny_sd, PROMPTS[0]).repeat(2, 1, 1)
    scale = module.row_scale(torch.tensor([10, 999]), states)  # buckets 0 and 3 of 1000 steps
    assert torch.equal(scale, module.tlmo[[0, 3]])


def test_shapes_are_checked_against_the_served_unet(tiny_sd, tiny_sdxl, tiny_flux):
    config = {"width": 0.5, "buckets": 4}
    patch = _patch(tiny_sd, _eraser(tiny_sd, config), config)
    patch.manifest.params["module_config"] = {"width": 1.0, "buckets": 4}  # lies about width
    with pytest.raises(PatchIncompatible):
        patch.verify(tiny_sd)
    # SDXL's U-Net takes one too; Flux has no U-Net skip connections to add to.
    sdxl = _patch(tiny_sdxl, _eraser(tiny_sdxl, config), config)
    sdxl.verify(tiny_sdxl)
    assert DenoiserRouter(tiny_sdxl).prepare([sdxl]).modules
    with pytest.raises(WrongTarget, match="unet"):
        Patch.create(
            pipe=tiny_flux,
            kind="unet_module",
            component="unet",
            method="dumo",
            concepts=["cat"],
            tensors={"module.x": torch.zeros(1)},
            params={"module_type": "dumo_epr", "module_config": config},
        )


def test_a_contrastive_gate_ignores_tokens_other_prompts_share():
    """A token as close to the concept as to another prompt's (a shared word) opens nothing
    with the contrast, however close it is to the concept."""
    from patches.skip_eraser import gate_score

    d = 8
    concept = torch.eye(d)[:1]  # the concept word's state
    shared = torch.nn.functional.normalize(torch.eye(d)[0] + torch.eye(d)[1], dim=0)
    start = torch.zeros(d)
    about_concept = torch.stack([start, torch.eye(d)[0], torch.eye(d)[3]])[None]
    only_shared = torch.stack([start, shared, torch.eye(d)[3]])[None]
    contrast = shared[None]  # other prompts hold the shared word
    plain = gate_score(torch.cat([about_concept, only_shared]), concept)
    assert plain[1] > 0.7  # the plain gate half-opens for the shared word alone
    scores = gate_score(torch.cat([about_concept, only_shared]), concept, contrast)
    assert scores[0] > 0.25 and scores[1] <= 0.0


def test_the_minicanvas_gates_separate_once_the_contrast_covers_every_position():
    """MiniCanvas's `cross` (synonym "plus sign"): "a plain square" scored 0.967 against the
    concept's lowest held-out prompt at 0.952 with the plain gate, so the gate opened on
    every object's plain prompts and the patch damaged them (IRA 71% against 95%).
    `dots`: with the retain prompts' tokens alone in the contrast, "a plain cross" scored
    0.41 at a padding position, above "a crescent in dots style" (0.34); the gate sat inside
    the overlap and stayed shut on crescent's dots cells (UA 87.5%)."""
    from bench.minicanvas.erasure_settings import dumo_config
    from erasure.dumo.train import _Trainer
    from patches.loading import load_pipeline
    from server.default_model import default_model_path

    pipe = load_pipeline(str(default_model_path()), "float32", "cpu")
    for concept, contrast, separable in (
        ("cross", 0, False),
        ("cross", 1024, True),
        ("dots", 1024, True),
    ):
        trainer = _Trainer(pipe, dumo_config([concept], gate_contrast_tokens=contrast))
        report = trainer.gate_report
        assert report["separable"] is separable, (concept, report)
        # Two pools of at most `contrast` each: the retain prompts' tokens, their padding.
        assert contrast <= report["contrast_tokens"] <= 2 * contrast
        assert report["concept_similarity_min"] > report["other_similarity_max"] or not separable
