"""Prompts a method gets when the user names only the concept: the retain set, the probe set
for the patch's verdict, and templates in the shapes this model's users write.

- Retain set: the built-in general prompts (erasure/data/retain_prompts.txt) plus, when the
  model folder ships a prompt sample (`captions.txt`, one per line; MiniCanvas ships its
  training captions), that sample. Prompts naming an erased concept or one of its synonyms
  are dropped.
- Probe set: every fifth prompt of each source is held out of training; the verdict measures
  drift on prompts the patch never saw.
- Templates: generic prompt shapes per kind of concept, plus the model's own captions that
  name the concept, with the concept's word turned into the `{concept}` slot ("a circle in
  neon style" -> "a {concept} in neon style").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from erasure.prompts import DEFAULT_TEMPLATES, SLOT, ConceptSpec

MODEL_PROMPTS_FILE = "captions.txt"
PROBE_EVERY = 5  # every fifth prompt of a source is a probe, never trained on
# MiniCanvas's sample gives 99 shapes per object; a spread of 32 dropped whole styles.
MAX_MODEL_TEMPLATES = 128


def _lines(text: str) -> list[str]:
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def general_prompts() -> list[str]:
    """The built-in general retain set, in file order."""
    text = resources.files("erasure.data").joinpath("retain_prompts.txt").read_text("utf-8")
    return _lines(text)


def model_prompts(model: str | Path) -> list[str]:
    """The prompt sample a model folder ships (`captions.txt`), or [] when it has none."""
    path = Path(model) / MODEL_PROMPTS_FILE
    return _lines(path.read_text("utf-8")) if path.is_file() else []


def _word_pattern(words: Iterable[str]) -> re.Pattern[str]:
    alternatives = sorted((re.escape(w.strip()) for w in words if w.strip()), key=len, reverse=True)
    return re.compile(rf"(?<!\w)({'|'.join(alternatives)})(?!\w)", re.IGNORECASE)


def names_any(prompt: str, concepts: Sequence[ConceptSpec]) -> bool:
    """Whether `prompt` names one of the concepts or their synonyms (whole words)."""
    return bool(_word_pattern(w for c in concepts for w in c.words).search(prompt))


@dataclass(frozen=True)
class DefaultPrompts:
    retain: tuple[str, ...]  # trained on
    probes: tuple[str, ...]  # held out: the verdict's drift is measured here
    sources: tuple[str, ...]  # where they came from, for the report


def _split(prompts: list[str]) -> tuple[list[str], list[str]]:
    train = [p for i, p in enumerate(prompts) if i % PROBE_EVERY != PROBE_EVERY - 1]
    probes = [p for i, p in enumerate(prompts) if i % PROBE_EVERY == PROBE_EVERY - 1]
    return train, probes


def default_prompts(model: str | Path, concepts: Sequence[ConceptSpec]) -> DefaultPrompts:
    """The retain and probe sets for erasing `concepts` from the model at `model`."""
    retain: list[str] = []
    probes: list[str] = []
    sources = []
    own = model_prompts(model)
    for name, prompts in ((f"{model}/{MODEL_PROMPTS_FILE}", own), ("built-in", general_prompts())):
        kept = [p for p in prompts if not names_any(p, concepts)]
        if not kept:
            continue
        train, held_out = _split(kept)
        retain += train
        probes += held_out
        sources.append(f"{name} ({len(kept)})")
    return DefaultPrompts(tuple(retain), tuple(probes), tuple(sources))


def model_templates(model: str | Path, concepts: Sequence[ConceptSpec]) -> list[str]:
    """The model's own captions naming one of `concepts` (by name or synonym), with that
    word as the `{concept}` slot; at most MAX_MODEL_TEMPLATES, spread over the sample."""
    found: list[str] = []
    for concept in concepts:
        pattern = _word_pattern(concept.words)
        for caption in model_prompts(model):
            if len(pattern.findall(caption)) == 1 and not names_any(
                pattern.sub("", caption), concepts
            ):
                template = pattern.sub(SLOT, caption)
                if template not in found:
                    found.append(template)
    if len(found) <= MAX_MODEL_TEMPLATES:
        return found
    step = len(found) / MAX_MODEL_TEMPLATES
    return [found[int(i * step)] for i in range(MAX_MODEL_TEMPLATES)]


def default_templates(model: str | Path, concepts: Sequence[ConceptSpec], kind: str) -> tuple:
    """Generic templates for `kind` plus the model's own caption shapes for the concepts."""
    generic = list(DEFAULT_TEMPLATES[kind])
    return tuple(generic + [t for t in model_templates(model, concepts) if t not in generic])
