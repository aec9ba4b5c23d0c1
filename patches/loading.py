"""Loading a diffusers pipeline from a local folder or a hub id, with a clear refusal."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from patches.errors import ModelLoadError
from patches.targets import pipeline_family

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(source: str | os.PathLike, dtype: str | torch.dtype = "float32", device="cpu"):
    """Load an SD 1.x/2.x, SDXL or Flux pipeline.

    `source` is a diffusers folder (with model_index.json) or, where the machine may reach a
    hub (HF_HUB_OFFLINE unset), a hub id.
    """
    from diffusers import DiffusionPipeline

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path = Path(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if path.exists() and not (path / "model_index.json").exists():
        raise ModelLoadError(
            f"{source} is not a diffusers pipeline folder: it has no model_index.json"
        )
    if not path.exists() and offline:
        raise ModelLoadError(
            f"{source} is not a local folder, and the hub is off (HF_HUB_OFFLINE=1): pass the "
            "path of a diffusers pipeline folder"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(source), dtype=torch_dtype, local_files_only=offline
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {source} as a diffusers pipeline: {exc}") from None
    pipeline_family(pipe)  # refuses pipelines ConceptGuard cannot patch
    return pipe.to(device)
