"""Judges: small classifiers with a style head and an object head, trained on real renders.

Two architectures (a strided CNN and a pooled CNN with an MLP head) with different seeds,
so that agreement between them can be reported. Judges never see generated images; light
blur and noise augmentation of real renders makes them read decoded images reliably.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from bench.minicanvas.data import RenderedSet
from bench.minicanvas.world import OBJECT_CLASSES, STYLE_CLASSES

ARCHITECTURES = ("strided", "pooled")


def strided_encoder(width: int, out_dim: int) -> nn.Sequential:
    """Three stride-2 convolutions (32 -> 4 pixels) and a position-aware linear head."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, stride=2, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * w * 16, out_dim),
    )


class Judge(nn.Module):
    def __init__(self, architecture: str = "strided", width: int = 32):
        super().__init__()
        self.architecture = architecture
        w = width
        if architecture == "strided":
            self.features = nn.Sequential(*strided_encoder(w, 4 * w), nn.ReLU())
            dim = 4 * w
        elif architecture == "pooled":
            self.features = nn.Sequential(
                nn.Conv2d(3, w, 5, padding=2),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1),
                nn.BatchNorm2d(2 * w),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(2 * w, 2 * w, 3, padding=1),
                nn.BatchNorm2d(2 * w),
                nn.ReLU(),
                nn.AdaptiveMaxPool2d(2),
                nn.Flatten(),
                nn.Linear(8 * w, 4 * w),
                nn.ReLU(),
            )
            dim = 4 * w
        else:
            raise ValueError(f"unknown judge architecture {architecture!r}")
        self.style_head = nn.Linear(dim, len(STYLE_CLASSES))
        self.object_head = nn.Linear(dim, len(OBJECT_CLASSES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images in [-1, 1], [n, 3, 32, 32] -> (style logits, object logits)."""
        h = self.features(images)
        return self.style_head(h), self.object_head(h)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        self.eval()
        styles, objects = [], []
        for start in range(0, len(images), batch):
            s, o = self(images[start : start + batch])
            styles.append(s.argmax(1))
            objects.append(o.argmax(1))
        return torch.cat(styles), torch.cat(objects)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = len(images)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(n, 1, 1, 1, generator=generator) * 0.6
    images = images * (1 - amount) + blurred * amount
    noise = (
        torch.randn(images.shape, generator=generator)
        * torch.rand(n, 1, 1, 1, generator=generator)
        * 0.08
    )
    return (images + noise).clamp(-1, 1)


@dataclass
class JudgeReport:
    architecture: str
    seed: int
    steps: int
    seconds: float
    style_acc: float
    object_acc: float


def accuracy(judge: Judge, data: RenderedSet) -> tuple[float, float]:
    styles, objects = judge.classify(data.tensors())
    style_acc = (styles.numpy() == data.styles).mean()
    object_acc = (objects.numpy() == data.objects).mean()
    return float(style_acc), float(object_acc)


def train_judge(
    train: RenderedSet,
    held_out: RenderedSet,
    architecture: str,
    seed: int,
    steps: int = 3000,
    batch: int = 128,
    lr: float = 2e-3,
) -> tuple[Judge, JudgeReport]:
    torch.manual_seed(seed)
    judge = Judge(architecture)
    generator = torch.Generator().manual_seed(seed)
    images = train.tensors()
    styles, objects = torch.from_numpy(train.styles), torch.from_numpy(train.objects)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    started = time.perf_counter()
    judge.train()
    for _ in tqdm(range(steps), desc=f"judge {architecture}", unit="step", mininterval=5):
        index = torch.randint(len(images), (batch,), generator=generator)
        style_logits, object_logits = judge(_augment(images[index], generator))
        loss = F.cross_entropy(style_logits, styles[index]) + F.cross_entropy(
            object_logits, objects[index]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    style_acc, object_acc = accuracy(judge, held_out)
    report = JudgeReport(
        architecture, seed, steps, round(time.perf_counter() - started, 1), style_acc, object_acc
    )
    return judge, report


def save_judge(judge: Judge, path: Path) -> None:
    save_file(judge.state_dict(), str(path), metadata={"architecture": judge.architecture})


def load_judge(path: Path) -> Judge:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        architecture = handle.metadata()["architecture"]
    judge = Judge(architecture)
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()
