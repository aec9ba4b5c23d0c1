"""The registry's marker file, `registry.json`: proof that a registry exists at a location,
and an upper bound on every generation it has issued.

Without it, a directory whose `state.json` has gone (moved away, a half-restored backup, a
volume mounted without it) looks exactly like a brand-new, empty registry: every tenant would
be served the unpatched model and the next write would start again at generation 1. So a
registry is created once, explicitly (state first, then the marker), and from then on a
missing state is an error. Every write raises the marker's generation before it writes the
state, so `recover` can restore an older state under a generation no worker has seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from patches.atomic import atomic_write_bytes
from patches.errors import RegistryCorrupt

MARKER_NAME = "registry.json"
MARKER_FORMAT = 1


@dataclass(frozen=True)
class RegistryMarker:
    created_at: str
    # At least the generation of every state.json ever written here.
    generation: int

    def to_json(self) -> bytes:
        document = {
            "format": MARKER_FORMAT,
            "created_at": self.created_at,
            "generation": self.generation,
        }
        return json.dumps(document).encode()


def read_marker(path: Path) -> RegistryMarker | None:
    """The marker at `path`, or None when there is none."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        document = json.loads(text)
        if document["format"] != MARKER_FORMAT or type(document["generation"]) is not int:
            raise ValueError("unexpected format or generation")
        return RegistryMarker(str(document["created_at"]), document["generation"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryCorrupt(
            f"the registry's {MARKER_NAME} is not a valid marker: {exc}"
        ) from None


def write_marker(path: Path, marker: RegistryMarker, tmp_dir: Path) -> None:
    atomic_write_bytes(path, marker.to_json(), tmp_dir=tmp_dir)
