"""Rendered MiniCanvas datasets: images with their labels and captions, from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.minicanvas.render import SIZE, render
from bench.minicanvas.world import OBJECT_CLASSES, STYLE_CLASSES, sample


@dataclass
class RenderedSet:
    images: np.ndarray  # [n, SIZE, SIZE, 3] uint8
    objects: np.ndarray  # [n] index into OBJECT_CLASSES
    styles: np.ndarray  # [n] index into STYLE_CLASSES
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def tensors(self, index=slice(None)) -> torch.Tensor:
        """Images as float tensors [n, 3, SIZE, SIZE] in [-1, 1] (the diffusers convention)."""
        images = torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float()
        return images / 127.5 - 1.0


def render_set(n: int, seed: int) -> RenderedSet:
    """`n` training-distribution samples (captions as in training), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    objects = np.empty(n, np.int64)
    styles = np.empty(n, np.int64)
    captions = []
    for i in range(n):
        item = sample(rng)
        images[i] = np.round(render(item.object, item.style, rng) * 255)
        objects[i] = OBJECT_CLASSES.index(item.object)
        styles[i] = STYLE_CLASSES.index(item.style)
        captions.append(item.caption)
    return RenderedSet(images, objects, styles, captions)


def render_grid(n_per_cell: int, seed: int) -> RenderedSet:
    """A balanced set over every (object, style) class pair, for held-out judge accuracy."""
    rng = np.random.default_rng(seed)
    cells = [(o, s) for o in OBJECT_CLASSES for s in STYLE_CLASSES]
    n = len(cells) * n_per_cell
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    objects = np.empty(n, np.int64)
    styles = np.empty(n, np.int64)
    for i in range(n):
        obj, style = cells[i % len(cells)]
        images[i] = np.round(render(obj, style, rng) * 255)
        objects[i] = OBJECT_CLASSES.index(obj)
        styles[i] = STYLE_CLASSES.index(style)
    return RenderedSet(images, objects, styles, [""] * n)
