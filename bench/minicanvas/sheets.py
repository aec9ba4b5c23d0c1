"""PNG sheets of MiniCanvas images, for a person to look at what the numbers count."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from bench.minicanvas.quality import Cell, Judged

_SCALE = 3  # 32-pixel images are enlarged for viewing (nearest neighbour)


def _framed(image: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(image, (1, 1, 1, 1), value=1)


def _rows(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.cat([torch.cat([_framed(x) for x in row], 2) for row in rows], 1)


def _to_pixels(sheet: torch.Tensor) -> np.ndarray:
    return ((sheet + 1) * 127.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _save(panels: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    parts = [panels[0]]
    for panel in panels[1:]:
        parts += [gap, panel]
    image = Image.fromarray(np.concatenate(parts, 1))
    image.resize((image.width * _SCALE, image.height * _SCALE), Image.NEAREST).save(path)


def pick(judged: Judged, cells: list[Cell]) -> list[torch.Tensor]:
    """The images of `judged` for `cells` (matched by object, style and seed)."""
    lookup = {(c.obj, c.style, c.seed): i for i, c in enumerate(judged.cells)}
    return [judged.images[lookup[(c.obj, c.style, c.seed)]] for c in cells]


def save_panels(path: Path, panels: list[list[list[torch.Tensor]]]) -> None:
    """Side-by-side panels, each a list of rows of images."""
    _save([_to_pixels(_rows(rows)) for rows in panels], path)


def grid_panels(judged_list: list[Judged], objects, styles, seed: int) -> list:
    """One panel per judged grid: rows objects, columns styles, at one seed."""
    panels = []
    for judged in judged_list:
        lookup = {(c.obj, c.style): i for i, c in enumerate(judged.cells) if c.seed == seed}
        panels.append([[judged.images[lookup[(o, s)]] for s in styles] for o in objects])
    return panels
