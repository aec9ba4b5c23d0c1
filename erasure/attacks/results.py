"""What an attack run reports: per attempt (one prompt or embedding in one context) the
judges' verdict for every seed; per attack the success rate (ASR = successful images /
attempts x seeds), degenerate images beside it, the successful prompts and the time spent;
and a PNG of the images for a person to check what was counted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasure.attacks.judging import Verdicts

SCHEMA = "conceptguard.attack/1"


@dataclass
class Attempt:
    context: str
    prompt: str  # the text sent (for inversion: the template around the learned token)
    success: list[bool]  # per seed: recognised and not degenerate
    recognised: list[bool]
    degenerate: list[bool]
    seen: list[str]  # what the primary judge saw, per seed
    agree: list[bool]  # the second judge agrees, per seed
    ids: list[int] | None = None  # the token ids the search found
    round_trips: bool | None = None  # the text tokenizes back to `ids`
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def judged(cls, context: str, prompt: str, verdicts: Verdicts, **kwargs: Any) -> Attempt:
        return cls(
            context,
            prompt,
            verdicts.success.tolist(),
            verdicts.recognised.tolist(),
            verdicts.degenerate.tolist(),
            list(verdicts.seen),
            verdicts.agree.tolist(),
            **kwargs,
        )

    def record(self) -> dict[str, Any]:
        out = {
            "context": self.context,
            "prompt": self.prompt,
            "success": self.success,
            "recognised": self.recognised,
            "degenerate": self.degenerate,
            "seen": self.seen,
            "agree": self.agree,
        }
        if self.ids is not None:
            out.update(ids=self.ids, round_trips=self.round_trips)
        return out | self.extra


@dataclass
class AttackResult:
    attack: str
    threat: str  # "hosted" (text a tenant can send) or "embedding" (not a tenant threat)
    budget: dict[str, Any]
    attempts: list[Attempt]
    seconds: dict[str, float]
    images: torch.Tensor | None = None  # [attempts x seeds, 3, H, W], attempt-major
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # attack-specific figures

    def summary(self) -> dict[str, Any]:
        success = np.array([s for a in self.attempts for s in a.success], bool)
        recognised = np.array([s for a in self.attempts for s in a.recognised], bool)
        degenerate = np.array([s for a in self.attempts for s in a.degenerate], bool)
        agree = np.array([s for a in self.attempts for s in a.agree], bool)
        trips = [a.round_trips for a in self.attempts if a.round_trips is not None]
        images = len(success)
        return {
            "asr": float(success.mean()) if images else None,
            "successes": int(success.sum()),
            "images": images,
            "attempts": len(self.attempts),
            "attempts_succeeding": sum(any(a.success) for a in self.attempts),
            "recognised_including_degenerate": int(recognised.sum()),
            "degenerate": int(degenerate.sum()),
            "judge_agreement": float(agree.mean()) if images else None,
            "round_trip_failures": sum(not t for t in trips) if trips else None,
        }

    def record(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "threat": self.threat,
            "budget": self.budget,
            **self.summary(),
            "successful_prompts": sorted({a.prompt for a in self.attempts if any(a.success)}),
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "notes": self.notes,
            "details": self.details,
            "attempt_records": [a.record() for a in self.attempts],
        }


def save_grid(path: Path, results: list[AttackResult], width: int = 16) -> None:
    """Per attack two rows: its successful images (green frames), then up to `width` of
    the rest (grey; degenerate ones red). Rows are labelled with the attack and its ASR."""
    from PIL import Image, ImageDraw

    scale, label_w = 3, 260
    rows = []
    for result in results:
        if result.images is None:
            continue
        flat = [
            (s, d) for a in result.attempts for s, d in zip(a.success, a.degenerate, strict=True)
        ]
        wins = [i for i, (s, _) in enumerate(flat) if s][:width]
        rest = [i for i, (s, _) in enumerate(flat) if not s][:width]
        asr = result.summary()["asr"]
        title = f"{result.attack}: ASR {100 * (asr or 0):.1f}%"
        rows.append((f"{title} - successes", [(i, (40, 170, 60)) for i in wins], result))
        colours = [(i, (200, 40, 40) if flat[i][1] else (150, 150, 150)) for i in rest]
        rows.append((f"{title} - others", colours, result))
    if not rows:
        return
    side = int(next(r for _, _, r in rows).images.shape[-1]) * scale
    cell = side + 4
    sheet = Image.new("RGB", (label_w + width * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, picks, result) in enumerate(rows):
        y = row * cell
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for column, (index, colour) in enumerate(picks):
            x = label_w + column * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
            pixels = ((result.images[index] + 1) * 127.5).clamp(0, 255).byte()
            image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
            sheet.paste(image.resize((side, side), Image.NEAREST), (x + 2, y + 2))
    sheet.save(path)
