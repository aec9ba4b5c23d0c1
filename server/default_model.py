"""The model `conceptguard serve` runs when none is given.

Until the MiniCanvas model is committed, this is the tiny built-in SD pipeline, written once
to a cache folder and then loaded with `from_pretrained` like any user model.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("CONCEPTGUARD_CACHE") or Path.home() / ".cache" / "conceptguard"
    return Path(base)


def default_model_path() -> Path:
    """Path of the default model folder, building it on first use (safe across processes)."""
    from bench.tiny_pipelines import save_tiny_pipeline

    root = cache_dir() / "models"
    path = root / "tiny-sd-seed0"
    # Built and published by an atomic rename, so a complete folder needs no lock (and a
    # read-only cache, as in the container image, works).
    if (path / "model_index.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model_index.json").exists():
            staging = root / ".tiny-sd-seed0.partial"
            if staging.exists():
                import shutil

                shutil.rmtree(staging)
            save_tiny_pipeline("sd", staging, seed=0)
            os.replace(staging, path)
    return path
