"""Flags every `conceptguard erase` method shares: concepts with their words, templates."""

from __future__ import annotations

import argparse

from erasure.prompts import ConceptSpec, PromptError, read_prompt_file


def _per_concept(values: list[str], count: int, flag: str) -> list[str | None]:
    if not values:
        return [None] * count
    if len(values) == 1 and count > 1 and flag == "--anchor":
        return values * count
    if len(values) != count:
        raise PromptError(f"give {flag} once per --concept ({count}), or not at all")
    return list(values)


def concepts_from_args(args: argparse.Namespace) -> list[ConceptSpec]:
    """`--concept` (repeatable) with `--synonyms` and, where the method has it, `--anchor`
    in the same order (a single `--anchor` applies to all)."""
    count = len(args.concept)
    synonyms = _per_concept(args.synonyms, count, "--synonyms")
    anchors = _per_concept(getattr(args, "anchor", []), count, "--anchor")
    out = []
    for name, syn, anchor in zip(args.concept, synonyms, anchors, strict=True):
        words = tuple(w.strip() for w in (syn or "").split(",") if w.strip())
        if not name.strip():
            raise PromptError("--concept must not be empty")
        out.append(ConceptSpec(name.strip(), words, anchor.strip() if anchor else None))
    return out


def templates_from_args(args: argparse.Namespace) -> tuple[str, ...] | None:
    """`--template` flags plus `--templates-file` lines; None for the method's defaults."""
    templates = list(args.template)
    if args.templates_file:
        templates += read_prompt_file(args.templates_file)
    return tuple(templates) or None
