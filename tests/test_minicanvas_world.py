"""MiniCanvas world: deterministic renders and captions, the tokenizer, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.minicanvas.data import render_grid, render_set
from bench.minicanvas.render import SIZE, render
from bench.minicanvas.world import (
    HELD_OUT_TEMPLATE,
    OBJECT_CLASSES,
    STYLE_CLASSES,
    TRAIN_TEMPLATES,
    held_out_prompt,
)


def test_renders_are_deterministic_for_a_seed():
    a, b, c = render_set(64, seed=5), render_set(64, seed=5), render_set(64, seed=6)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("obj", OBJECT_CLASSES)
def test_every_object_and_style_renders_distinctly(obj):
    rng = np.random.default_rng(0)
    images = [render(obj, style, rng) for style in STYLE_CLASSES]
    for image in images:
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
    means = np.array([img.reshape(-1, 3).mean(0) for img in images])
    # Every style has its own palette: no two styles share a mean colour.
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(len(images), dtype=bool)].min() > 0.02


def test_objects_change_the_image_within_a_style():
    for style in STYLE_CLASSES:
        blank = render("none", style, np.random.default_rng(1))
        drawn = render("circle", style, np.random.default_rng(1))
        assert np.abs(drawn - blank).mean() > 0.01, style


def test_the_held_out_template_never_appears_in_training_captions():
    captions = set(render_set(3000, seed=7).captions)
    held_out = {held_out_prompt(o, s) for o in OBJECT_CLASSES[:-1] for s in STYLE_CLASSES[:-1]}
    assert not captions & held_out
    assert HELD_OUT_TEMPLATE not in TRAIN_TEMPLATES
    empty = sum(1 for c in render_set(3000, seed=7).captions if c == "") / 3000
    assert 0.07 < empty < 0.2  # about 10% empty captions for classifier-free guidance


def test_grid_is_balanced():
    grid = render_grid(2, seed=0)
    assert len(grid) == 2 * len(OBJECT_CLASSES) * len(STYLE_CLASSES)
    assert set(np.bincount(grid.objects)) == {2 * len(STYLE_CLASSES)}


def test_tokenizer_has_one_token_per_world_word_and_loads_with_stock_class(tmp_path):
    from transformers import CLIPTokenizer

    from bench.minicanvas.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    prompt = held_out_prompt("crescent", "watercolor")
    tokens = tokenizer.tokenize(prompt)
    assert tokens == [w + "</w>" for w in prompt.split()]
    tokenizer.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(prompt).input_ids == tokenizer(prompt).input_ids
    assert again.model_max_length == tokenizer.model_max_length


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    from bench.minicanvas.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, optimizer, {"step": 3})
    assert path.read_bytes()[8:9] == b"{"  # safetensors framing, never a pickle

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert load_checkpoint(path, fresh, fresh_opt) == {"step": 3}
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    batch = torch.randn(8, 4)
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        o.zero_grad()
        m(batch).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
