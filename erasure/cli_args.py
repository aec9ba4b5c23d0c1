"""Flags every `conceptguard erase` method shares: the model, concepts with their words,
templates, retain prompts and where the patch goes; and their reading."""

from __future__ import annotations

import argparse

from erasure.prompts import ConceptSpec, PromptError, read_prompt_file


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --concept with --synonyms, --kind and the templates."""
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    parser.add_argument("--concept", action="append", required=True, help="concept (repeatable)")
    parser.add_argument(
        "--synonyms", action="append", default=[], help="comma-separated, per --concept"
    )
    parser.add_argument("--kind", choices=("object", "style"), default="object")
    parser.add_argument(
        "--template", action="append", default=[], help="prompt template with {concept}"
    )
    parser.add_argument("--templates-file", help="one template per line")


def add_retain_arguments(
    parser: argparse.ArgumentParser,
    prompts_help: str,
    weight_default: float | None,
    weight_help: str,
) -> None:
    """--retain-prompts (a file, one per line) and --retain-weight."""
    parser.add_argument("--retain-prompts", help=prompts_help)
    parser.add_argument("--retain-weight", type=float, default=weight_default, help=weight_help)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--seed, --device, --dtype, the patch name and file, and the JSON report."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--name", help="patch name recorded in the manifest")
    parser.add_argument("-o", "--output", required=True, help="patch file to write")
    parser.add_argument("--json", dest="json_out", help="write the run report as JSON here")


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


def retain_prompts_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """`--retain-prompts` file lines; empty without the flag."""
    return tuple(read_prompt_file(args.retain_prompts)) if args.retain_prompts else ()
