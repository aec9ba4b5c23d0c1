"""Drawing MiniCanvas images: object masks and style renderers, in numpy.

Masks are evaluated on a 2x supersampled grid and averaged, so edges are antialiased. Each
style owns a palette family and a texture coarse enough to survive 32x32 and an 8x8 latent.
"""

from __future__ import annotations

import math

import numpy as np

from bench.minicanvas.world import NONE_OBJECT, PLAIN_STYLE

SIZE = 32
_SS = 2  # supersampling factor for antialiased masks
_AXIS = (np.arange(SIZE * _SS) + 0.5) / (SIZE * _SS) * 2 - 1
_GX, _GY = np.meshgrid(_AXIS, _AXIS)  # x to the right, y downwards, both in [-1, 1]
_PIX = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
_PX, _PY = np.meshgrid(_PIX, _PIX)


def _star_radius(theta: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    # Straight edges between alternating outer (1) and inner vertices.
    sector = 2 * math.pi / points
    local = np.mod(theta + math.pi / 2, sector) - sector / 2
    half = sector / 2
    outer = np.array([1.0, 0.0])
    inner_vertex = inner * np.array([math.cos(half), math.sin(half)])
    return _line_radius(np.abs(local), outer, inner_vertex)


def _line_radius(phi: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from the origin, along angle phi, to the segment a-b (polar line form)."""
    normal = np.array([b[1] - a[1], a[0] - b[0]])
    normal /= np.linalg.norm(normal)
    d = abs(float(a @ normal))
    angle = math.atan2(normal[1], normal[0])
    return d / np.maximum(np.cos(phi - angle), 1e-6)


def _shape(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test in the object's own frame (unit size, y downwards)."""
    r = np.hypot(u, v)
    if name == "circle":
        return r < 0.9
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.75
    if name == "triangle":
        # Apex up: three half-planes of an equilateral triangle with circumradius 1.
        return (v < 0.5) & (v > -1 + 1.732 * np.abs(u) * 1.0) & (np.abs(u) < 0.866)
    if name == "star":
        return r < _star_radius(np.arctan2(v, u))
    if name == "cross":
        arm = 0.3
        return ((np.abs(u) < arm) & (np.abs(v) < 0.95)) | ((np.abs(v) < arm) & (np.abs(u) < 0.95))
    if name == "ring":
        return (r < 0.95) & (r > 0.55)
    if name == "crescent":
        return (r < 0.95) & (np.hypot(u - 0.45, v + 0.1) > 0.75)
    if name == "heart":
        x, y = u * 1.15, -(v * 1.15 + 0.15)
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 < 0
    raise ValueError(f"unknown object {name!r}")


def object_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """A [SIZE, SIZE] float mask in [0, 1] at a random position, scale and small rotation."""
    scale = rng.uniform(0.48, 0.66)
    cx, cy = rng.uniform(-0.3, 0.3, size=2)
    angle = math.radians(rng.uniform(-20, 20))
    c, s = math.cos(angle), math.sin(angle)
    x, y = (_GX - cx) / scale, (_GY - cy) / scale
    u, v = c * x + s * y, -s * x + c * y
    inside = _shape(name, u, v).astype(np.float32)
    return inside.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def _outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Edge band of a soft mask: dilation minus erosion (max/min filters by shifting)."""
    padded = np.pad(mask, width, mode="edge")
    shifts = [
        padded[width + dy : width + dy + SIZE, width + dx : width + dx + SIZE]
        for dy in range(-width, width + 1)
        for dx in range(-width, width + 1)
    ]
    stack = np.stack(shifts)
    return np.clip(stack.max(0) - stack.min(0), 0, 1)


def _blur(image: np.ndarray, passes: int = 2) -> np.ndarray:
    out = image
    for _ in range(passes):
        padded = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")
        out = (
            padded[:-2, 1:-1]
            + padded[2:, 1:-1]
            + padded[1:-1, :-2]
            + padded[1:-1, 2:]
            + 2 * padded[1:-1, 1:-1]
        ) / 6
    return out


def _jitter(rng: np.random.Generator, color, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def _fill(bg: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return bg * (1 - m) + color[None, None, :] * m


def _stripes(mask, rng):
    period = rng.uniform(5.5, 8.0)
    phase = rng.uniform(0, period)
    band = (np.mod(np.arange(SIZE) + phase, period) < period / 2)[:, None, None]
    a, b = _jitter(rng, (0.9, 0.2, 0.15)), _jitter(rng, (1.0, 0.65, 0.1))
    bg = np.where(band, a, b) * np.ones((SIZE, SIZE, 3), np.float32)
    return _fill(bg, mask, _jitter(rng, (0.12, 0.12, 0.3)))


def _dots(mask, rng):
    spacing = rng.uniform(6.0, 8.0)
    ox, oy = rng.uniform(0, spacing, 2)
    px, py = np.meshgrid(np.arange(SIZE) + ox, np.arange(SIZE) + oy)
    dx = np.mod(px, spacing) - spacing / 2
    dy = np.mod(py, spacing) - spacing / 2
    dot = np.clip(2.2 - np.hypot(dx, dy), 0, 1)[..., None]
    light, dark = _jitter(rng, (0.75, 0.88, 1.0)), _jitter(rng, (0.1, 0.3, 0.85))
    bg = light * (1 - dot) + dark * dot
    return _fill(bg, mask, _jitter(rng, (1.0, 0.85, 0.1)))


def _checker(mask, rng):
    cell = int(rng.integers(4, 7))
    ox, oy = rng.integers(0, cell, 2)
    ix, iy = np.meshgrid((np.arange(SIZE) + ox) // cell, (np.arange(SIZE) + oy) // cell)
    on = (np.mod(ix + iy, 2) == 0)[..., None]
    bg = np.where(on, _jitter(rng, (0.15, 0.6, 0.2)), _jitter(rng, (0.92, 0.95, 0.9)))
    return _fill(bg, mask, _jitter(rng, (0.65, 0.1, 0.6)))


def _gradient(mask, rng):
    direction = rng.uniform(-0.5, 0.5)
    t = np.clip((_PY + direction * _PX + 1) / 2, 0, 1)[..., None]
    top, bottom = _jitter(rng, (1.0, 0.55, 0.75)), _jitter(rng, (0.45, 0.15, 0.6))
    bg = top * (1 - t) + bottom * t
    return _fill(bg, mask, _jitter(rng, (0.98, 0.98, 0.95), 0.02))


def _hatching(rng) -> np.ndarray:
    period = rng.uniform(4.0, 6.0)
    px, py = np.meshgrid(np.arange(SIZE), np.arange(SIZE))
    return (np.mod(px + py + rng.uniform(0, period), period) < 1.0).astype(np.float32)


def _sketch(mask, rng):
    paper = _jitter(rng, (0.96, 0.93, 0.82), 0.03)
    ink = _jitter(rng, (0.2, 0.2, 0.22), 0.05)
    hatch = 0.25 * _hatching(rng)[..., None]
    bg = paper * (1 - hatch) + ink * hatch
    if mask is None:
        return bg
    return _fill(bg, np.clip(_outline(mask), 0, 1), ink)


def _mosaic(mask, rng):
    tile = 4
    n = SIZE // tile
    colors = rng.uniform(0.15, 1.0, (n, n, 3)).astype(np.float32)
    bg = np.repeat(np.repeat(colors, tile, 0), tile, 1)
    grout = np.ones((SIZE, SIZE), bool)
    grout[::tile, :] = False
    grout[:, ::tile] = False
    bg = bg * np.where(grout, 1.0, 0.55)[..., None]
    return _fill(bg, mask, _jitter(rng, (0.05, 0.05, 0.05), 0.03))


def _neon(mask, rng):
    glow = _jitter(rng, (0.1, 1.0, 0.95)) if rng.random() < 0.5 else _jitter(rng, (1.0, 0.2, 0.9))
    bg = np.zeros((SIZE, SIZE, 3), np.float32) + _jitter(rng, (0.03, 0.02, 0.08), 0.02)
    if mask is None:
        lines = np.zeros((SIZE, SIZE), np.float32)
        for _ in range(3):
            if rng.random() < 0.5:
                lines[int(rng.integers(2, SIZE - 2)), :] = 1
            else:
                lines[:, int(rng.integers(2, SIZE - 2))] = 1
        edge = lines
    else:
        edge = _outline(mask)
    light = np.clip(edge[..., None] * glow, 0, 1)
    halo = _blur(light, 2) * 1.6
    return np.clip(bg + light + halo, 0, 1)


def _watercolor(mask, rng):
    base = _jitter(rng, (0.85, 0.9, 0.95), 0.04)
    bg = np.ones((SIZE, SIZE, 3), np.float32) * base
    for _ in range(4):
        cx, cy = rng.uniform(-1, 1, 2)
        blob = np.exp(-((_PX - cx) ** 2 + (_PY - cy) ** 2) / rng.uniform(0.15, 0.4))[..., None]
        bg = bg * (1 - 0.5 * blob) + rng.uniform(0.55, 0.95, 3).astype(np.float32) * 0.5 * blob
    if mask is not None:
        bg = _fill(bg, mask * 0.85, rng.uniform(0.35, 0.7, 3).astype(np.float32))
    return _blur(bg, 3)


def _plain(mask, rng):
    bg = np.ones((SIZE, SIZE, 3), np.float32) * _jitter(rng, (0.97, 0.97, 0.97), 0.02)
    if mask is None:
        return bg
    return _fill(bg, mask, _jitter(rng, (0.05, 0.05, 0.05), 0.04))


_STYLES = {
    "stripes": _stripes,
    "dots": _dots,
    "checker": _checker,
    "gradient": _gradient,
    "sketch": _sketch,
    "mosaic": _mosaic,
    "neon": _neon,
    "watercolor": _watercolor,
    PLAIN_STYLE: _plain,
}
_MASK_OPTIONAL = {"sketch", "neon", "watercolor", PLAIN_STYLE}


def render(obj: str, style: str, rng: np.random.Generator) -> np.ndarray:
    """A [SIZE, SIZE, 3] float32 image in [0, 1] of `obj` (or `none`) in `style`."""
    mask = None if obj == NONE_OBJECT else object_mask(obj, rng)
    if mask is None and style not in _MASK_OPTIONAL:
        mask = np.zeros((SIZE, SIZE), np.float32)
    return np.clip(_STYLES[style](mask, rng), 0, 1).astype(np.float32)
