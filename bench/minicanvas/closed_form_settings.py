"""MiniCanvas settings and sweep rows for the closed-form methods (UCE, ErasePro).

The prompts are the other methods' (erasure_settings.py): the world's training templates with
the concept's slot open, its synonym, the anchors `pattern` / `plain`, the other concepts'
training captions as the retain set. Variants:
- UCE: the aligned token positions, `all` (default), `content` or `span`;
- ErasePro: the chain, `text` (mlp.fc2 of blocks 0-2, stream target), `unet` (the U-Net's
  cross-attention keys and values) or `text-layer` (the text chain with METHODS.md's
  literal per-layer target).
"""

from __future__ import annotations

from typing import Any

from bench.minicanvas.erasure_settings import concept_spec, retain_prompts, templates
from bench.minicanvas.quality import concept_kind

UCE_VARIANTS = ("all", "content", "span")
ERASEPRO_VARIANTS = {
    "text": {"chain": "text", "target": "stream"},
    "text-layer": {"chain": "text", "target": "layer"},
    "unet": {"chain": "unet"},
}


def _prompt_settings(concepts: list[str]) -> dict[str, Any]:
    kinds = {concept_kind(c) for c in concepts}
    if len(kinds) != 1:
        raise ValueError("erase objects and styles in separate patches")
    kind = kinds.pop()
    return dict(
        concepts=[concept_spec(c) for c in concepts],
        kind=kind,
        templates=templates(kind),
        retain_prompts=retain_prompts(set(concepts)),
    )


def uce_config(concepts: list[str], variant: str = "all", **overrides: Any):
    """A UCE config for MiniCanvas concepts (all of one kind); the variant is the positions."""
    from erasure.uce import UceConfig

    if variant not in UCE_VARIANTS:
        raise ValueError(f"UCE variants: {', '.join(UCE_VARIANTS)}")
    return UceConfig(positions=variant, **_prompt_settings(concepts), **overrides)


def erasepro_config(concepts: list[str], variant: str = "text", **overrides: Any):
    """An ErasePro config for MiniCanvas concepts (all of one kind)."""
    from erasure.erasepro import EraseProConfig

    if variant not in ERASEPRO_VARIANTS:
        raise ValueError(f"ErasePro variants: {', '.join(ERASEPRO_VARIANTS)}")
    settings = {**ERASEPRO_VARIANTS[variant], **overrides}
    return EraseProConfig(**_prompt_settings(concepts), **settings)


def uce_row(pipe: Any, variant: str, concepts: list[str]):
    """The sweep row of UCE (bench/minicanvas/sweep_methods.py's Made)."""
    from bench.minicanvas.sweep_methods import Made
    from erasure.uce import erase_uce

    result = erase_uce(pipe, uce_config(concepts, variant))
    report = {"layers": result.layers, "cpu_seconds": result.cpu_seconds}
    return Made([result.patch], result.seconds, report)


def erasepro_row(pipe: Any, variant: str, concepts: list[str]):
    """The sweep row of ErasePro."""
    from bench.minicanvas.sweep_methods import Made
    from erasure.erasepro import erase_erasepro

    result = erase_erasepro(pipe, erasepro_config(concepts, variant))
    report = {
        "layers": result.layers,
        "readouts": result.readouts,
        "cpu_seconds": result.cpu_seconds,
    }
    return Made(result.patches, result.seconds, report)
