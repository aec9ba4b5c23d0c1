"""Adversarially hardened HiRM (in the spirit of AdvUnlearn): attacks on the patch are folded
back into its training.

Round 0 is plain HiRM. Each later round attacks the current patch and retrains HiRM from the
base with every prompt found so far added to its erase set, each sent where its benign twin
goes (HirmConfig.adversarial):
- the adaptive Ring-A-Bell search (erasure/attacks/ring_a_bell.py) against the patched text
  encoder: token sequences without the concept's own words whose PATCHED encoding lands where
  a benign prompt plus the concept would in the original encoder; the best few distinct
  sequences per context, twinned with that benign prompt;
- the UnlearnDiffAtk-style prefix search (erasure/attacks/unlearndiff.py) through the patched
  model's denoising loss on the base's image of a concept prompt: "prefix + prompt",
  twinned with "prefix + benign prompt".

The contexts are the method's own training templates (never an evaluation template), so an
attack run afterwards on held-out prompts is not the search the patch was trained against.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from erasure.attacks.generation import Sampling
from erasure.attacks.ring_a_bell import RingABellBudget, genetic_search, search_targets
from erasure.attacks.tokens import Vocabulary, as_text, attack_vocabulary, single_encoder
from erasure.attacks.unlearndiff import UnlearnDiffBudget, ranked_prefixes
from erasure.hirm.config import HirmConfig
from erasure.hirm.train import HirmResult, erase_hirm
from erasure.prompts import PromptError, fill


@dataclass(frozen=True)
class Hardening:
    rounds: int = 2  # adversarial rounds after the plain patch
    contexts: int = 4  # training templates searched from, per concept and round
    keep: int = 4  # distinct Ring-A-Bell sequences kept per context and round
    # The searches hardened HiRM was measured with (BENCHMARKS.md): one population, nothing
    # probed. A round folds in the `keep` best sequences per context; the attack command's
    # calibrated defaults (more populations, probes) would multiply a round's cost.
    search: RingABellBudget = field(
        default_factory=lambda: RingABellBudget(restarts=1, probes=1, probe_seeds=1)
    )
    # Training templates per concept and round attacked with the UnlearnDiffAtk-style prefix
    # search through the patched model (0: Ring-A-Bell only), on one base image each.
    prefixes: int = 4
    prefix_search: UnlearnDiffBudget = field(
        default_factory=lambda: UnlearnDiffBudget(probes=1, probe_seeds=1, per_context=1)
    )
    seed: int = 0


@dataclass
class HardenedResult:
    result: HirmResult  # the last round's patches and reports
    rounds: list[dict[str, Any]]  # per adversarial round: what the search found
    seconds: float


def _contexts(config: HirmConfig, count: int, seed: int) -> list[list[str]]:
    """Per concept: `count` of its training templates (a seeded sample)."""
    templates = list(config.resolved_templates())
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(templates), generator=generator).tolist()[:count]
    return [[templates[i] for i in order] for _ in config.concepts]


def adversarial_prompts(
    pipe: Any, patches: list, config: HirmConfig, hardening: Hardening, round_: int
) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """(concept, prompt, benign twin) found against `patches`, and the round's report."""
    single_encoder(pipe)
    started = time.perf_counter()
    tokenizer, search = pipe.tokenizer, hardening.search
    found: list[tuple[str, str, str]] = []
    report: dict[str, Any] = {"round": round_, "concepts": {}}
    per_concept = _contexts(config, hardening.contexts, hardening.seed + round_)
    for spec, templates in zip(config.concepts, per_concept, strict=True):
        if spec.anchor is None:
            raise PromptError(f"hardening needs an anchor for {spec.name!r} (the benign twins)")
        benign = [" ".join(fill([t], spec.anchor)[0].split()) for t in templates]
        targets = search_targets(
            pipe.text_encoder,
            tokenizer,
            spec,
            config.resolved_templates(),
            benign,
            search.eta,
        )
        vocabulary = attack_vocabulary(tokenizer, spec.words)
        for patch in patches:
            patch.apply(pipe)
        try:
            result = genetic_search(
                pipe.text_encoder,
                tokenizer,
                vocabulary.ids,
                targets,
                search,
                hardening.seed + 1000 * (round_ + 1),
                keep=hardening.keep,
            )
        finally:
            for patch in reversed(patches):
                patch.remove(pipe)
        prompts = []
        for twin, sequences in zip(benign, result.ranked or [], strict=True):
            for ids in sequences:
                text = as_text(tokenizer, ids).text
                found.append((spec.name, text, twin))
                prompts.append(text)
        prefixed = _prefixed(
            pipe, patches, spec.name, templates, benign, vocabulary, hardening, round_
        )
        found += [(spec.name, prompt, twin) for prompt, twin in prefixed]
        report["concepts"][spec.name] = {
            "prompts": prompts,
            "prefixed_prompts": [prompt for prompt, _ in prefixed],
            "fitness": result.fitness,
            "start_fitness": result.start_fitness,
        }
    report["seconds"] = round(time.perf_counter() - started, 2)
    return found, report


def _prefixed(
    pipe: Any,
    patches: list,
    name: str,
    templates: list[str],
    benign: list[str],
    vocabulary: Vocabulary,
    hardening: Hardening,
    round_: int,
) -> list[tuple[str, str]]:
    """(prefix + prompt, prefix + benign twin) for the first `hardening.prefixes` templates:
    the prefix found through the patched model's denoising loss on the base's image of the
    prompt (unlearndiff.ranked_prefixes, the lowest loss)."""
    count = min(hardening.prefixes, len(templates))
    if not count:
        return []
    prompts = [fill([t], name)[0] for t in templates[:count]]
    sampling = Sampling(())
    with torch.no_grad():
        latents = pipe(
            prompts,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance,
            generator=[torch.Generator().manual_seed(7100 + 10 * round_ + i) for i in range(count)],
            output_type="latent",
        ).images
    for patch in patches:
        patch.apply(pipe)
    try:
        out = []
        for i, (prompt, twin) in enumerate(zip(prompts, benign, strict=False)):
            seed = hardening.seed + 5000 * round_ + 100 * i
            search = hardening.prefix_search
            ids = ranked_prefixes(pipe, vocabulary, prompt, latents[i : i + 1], search, seed)[0][0]
            text = as_text(pipe.tokenizer, ids).text
            out.append((f"{text} {prompt}", f"{text} {twin}"))
    finally:
        for patch in reversed(patches):
            patch.remove(pipe)
    return out


def harden_hirm(pipe: Any, config: HirmConfig, hardening: Hardening) -> HardenedResult:
    """HiRM, then `hardening.rounds` rounds of attack-and-retrain (see the module doc)."""
    started = time.perf_counter()
    result = erase_hirm(pipe, config)
    adversarial = list(config.adversarial)
    rounds = []
    for round_ in range(1, hardening.rounds + 1):
        found, report = adversarial_prompts(pipe, result.patches, config, hardening, round_)
        adversarial += found
        record = {
            "adversarial_rounds": round_,
            "adversarial_prompts": len(adversarial),
            "adversarial_search": asdict(hardening.search),
        }
        trained = replace(config, adversarial=tuple(adversarial), extra={**config.extra, **record})
        result = erase_hirm(pipe, trained)
        report["prompts_in_training"] = len(adversarial)
        rounds.append(report)
    return HardenedResult(result, rounds, time.perf_counter() - started)
