"""Batched, seeded generation with a MiniCanvas pipeline, and judging of the results."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int


def generate(
    pipe,
    requests: list[Request],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch: int = 64,
    desc: str | None = None,
) -> torch.Tensor:
    """Images [n, 3, 32, 32] in [-1, 1]; image i depends only on (prompt_i, seed_i).

    `desc`: show a progress bar (images) under this label."""
    from tqdm import tqdm

    pipe.set_progress_bar_config(disable=True)
    out = []
    bar = tqdm(total=len(requests), desc=desc, unit="img", mininterval=5, disable=desc is None)
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        generators = [torch.Generator().manual_seed(r.seed) for r in chunk]
        images = pipe(
            [r.prompt for r in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pt",
        ).images
        out.append(images * 2 - 1)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out).float()


def judge_accuracy(judge, images: torch.Tensor, objects, styles) -> tuple[float, float]:
    """(style accuracy, object accuracy) of `images` against class indices."""
    predicted_styles, predicted_objects = judge.classify(images)
    style_acc = float((predicted_styles.numpy() == np.asarray(styles)).mean())
    object_acc = float((predicted_objects.numpy() == np.asarray(objects)).mean())
    return style_acc, object_acc
