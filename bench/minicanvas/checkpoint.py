"""Training checkpoints as safetensors + JSON (never pickles), written atomically.

A checkpoint holds a model's state, its optimizer's state and a small JSON of progress, so a
long CPU run can stop at any time and resume from the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from patches.atomic import atomic_write_bytes


def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict
) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().clone()
    meta = {"progress": progress, "param_groups": opt["param_groups"]}
    data = save_bytes(tensors, metadata={"checkpoint": json.dumps(meta)})
    atomic_write_bytes(path, data)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model and optimizer from `path`; returns the saved progress dict."""
    from safetensors import safe_open

    data = path.read_bytes()
    tensors = load_bytes(data)
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["checkpoint"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["progress"]
