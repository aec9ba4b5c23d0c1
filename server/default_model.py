"""The model `conceptguard serve` runs when none is given: the committed MiniCanvas pipeline.

Where it is looked for, first match wins:
1. `$CONCEPTGUARD_DEFAULT_MODEL` (the container image sets it to the copy it bakes in);
2. `models/minicanvas` of the source tree this package runs from (a git checkout, an
   editable install).
Either must be a diffusers folder; anything else is refused with what to do about it.
"""

from __future__ import annotations

import os
from pathlib import Path

from patches.errors import ModelLoadError

MODEL_ENV = "CONCEPTGUARD_DEFAULT_MODEL"
SOURCE_TREE_MODEL = Path(__file__).resolve().parents[1] / "models" / "minicanvas"


def default_model_path() -> Path:
    configured = os.environ.get(MODEL_ENV)
    if configured:
        path = Path(configured)
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"{MODEL_ENV}={configured} is not a diffusers pipeline folder (no model_index.json)"
            )
        return path
    if (SOURCE_TREE_MODEL / "model_index.json").exists():
        return SOURCE_TREE_MODEL
    raise ModelLoadError(
        f"no default model: {SOURCE_TREE_MODEL} is missing (this install has no source tree). "
        f"Pass --model DIR, or set {MODEL_ENV} to a diffusers pipeline folder such as a "
        "copy of the repository's models/minicanvas"
    )
