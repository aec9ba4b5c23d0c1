"""Flags every `conceptguard erase` method shares: the model, concepts with their words,
templates, retain prompts and where the patch goes; and their reading."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from erasure.default_prompts import default_prompts, default_templates
from erasure.prompts import ConceptSpec, PromptError, read_prompt_file


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --concept with --synonyms and --anchor, --kind and the templates."""
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    parser.add_argument("--concept", action="append", required=True, help="concept (repeatable)")
    parser.add_argument(
        "--synonyms", action="append", default=[], help="comma-separated, per --concept"
    )
    parser.add_argument(
        "--anchor",
        action="append",
        default=[],
        help="what the concept should become instead, e.g. its super-category (cat -> "
        "animal) or a neutral word; per --concept, or once for all",
    )
    parser.add_argument("--kind", choices=("object", "style"), default="object")
    parser.add_argument(
        "--template", action="append", default=[], help="prompt template with {concept}"
    )
    parser.add_argument(
        "--templates-file",
        help="one template per line (default: generic shapes plus the model folder's own "
        "captions that name the concept, when it ships captions.txt)",
    )


def add_retain_arguments(
    parser: argparse.ArgumentParser,
    prompts_help: str,
    weight_default: float | None,
    weight_help: str,
) -> None:
    """--retain-prompts (a file, one per line, or `none`) and --retain-weight."""
    parser.add_argument(
        "--retain-prompts",
        help=prompts_help + " (default: the built-in general set plus the model folder's "
        "captions.txt, without prompts naming the concept; `none`: no retain set)",
    )
    parser.add_argument("--retain-weight", type=float, default=weight_default, help=weight_help)


def add_timestep_arguments(parser: argparse.ArgumentParser, default: tuple[float, float]) -> None:
    """--timesteps: where on the sampling trajectory training draws x_t (ESD, DuMo)."""
    shown = ",".join(f"{x:g}" for x in default)
    parser.add_argument(
        "--timesteps",
        default=shown,
        help="fraction of the sampling trajectory x_t is drawn from, 0 being pure noise "
        f"(default {shown}; 0,1: all of it)",
    )


def timesteps_from_args(args: argparse.Namespace) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in args.timesteps.split(","))
    except ValueError:
        raise PromptError(
            f"--timesteps takes two fractions like 0,1, not {args.timesteps!r}"
        ) from None
    return low, high


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
    """`--concept` (repeatable) with `--synonyms` and `--anchor` in the same order (a single
    `--anchor` applies to all)."""
    count = len(args.concept)
    synonyms = _per_concept(args.synonyms, count, "--synonyms")
    anchors = _per_concept(args.anchor, count, "--anchor")
    out = []
    for name, syn, anchor in zip(args.concept, synonyms, anchors, strict=True):
        words = tuple(w.strip() for w in (syn or "").split(",") if w.strip())
        if not name.strip():
            raise PromptError("--concept must not be empty")
        out.append(ConceptSpec(name.strip(), words, anchor.strip() if anchor else None))
    return out


@dataclass(frozen=True)
class PromptChoice:
    """The prompts a run trains and checks on, and where they came from (for the report)."""

    templates: tuple[str, ...]
    retain: tuple[str, ...]
    check: tuple[str, ...]  # held out of training: the verdict's drift is measured here
    retain_source: str


def prompts_from_args(args: argparse.Namespace, concepts: list[ConceptSpec]) -> PromptChoice:
    """Templates from `--template`/`--templates-file`, else the defaults for the model;
    retain prompts from `--retain-prompts FILE`, none for `none`, else the default set."""
    templates = list(args.template)
    if args.templates_file:
        templates += read_prompt_file(args.templates_file)
    chosen = tuple(templates) or default_templates(args.model, concepts, args.kind)
    defaults = default_prompts(args.model, concepts)
    if args.retain_prompts is None:
        retain, source = defaults.retain, " + ".join(defaults.sources)
    elif args.retain_prompts.strip().lower() == "none":
        retain, source = (), "none"
    else:
        retain, source = tuple(read_prompt_file(args.retain_prompts)), args.retain_prompts
    check = tuple(p for p in defaults.probes if p not in set(retain))
    return PromptChoice(chosen, retain, check, source)
