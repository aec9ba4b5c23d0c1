"""What every attack works against: the local pipeline with the patch stack applied (white-box
access for the searches), the original text encoder (a copy taken before any patch), where
the patched model's images come from (this process or a server), the judge, the concept and
the token space; and what attacks share: judging attempts, the base model's concept images.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from erasure.attacks.concepts import AttackConcept, Context
from erasure.attacks.generation import LocalGenerator, Sampling, ServerGenerator
from erasure.attacks.judging import ConceptJudge
from erasure.attacks.results import Attempt
from erasure.attacks.tokens import AttackSetupError, Vocabulary

# The seed of the attacker's own check images (`Arena.probe`): never an evaluation seed
# (the CLI's 5000+) nor a concept image's (7000+).
PROBE_SEED = 9000


@dataclass
class ConceptImages:
    """The base model's images of the concept (the attack's 'images of the concept'): latents
    in the U-Net's space, per context, only those the judge recognises."""

    latents: torch.Tensor  # [n, c, h, w]
    contexts: list[Context]  # per latent
    seeds: list[int]
    judged_out: int  # generated but not recognised (left out)


@dataclass
class Arena:
    pipe: Any
    patches: list  # the stack, applied in this order
    concept: AttackConcept
    judge: ConceptJudge
    sampling: Sampling
    vocabulary: Vocabulary
    remote: ServerGenerator | None = None  # the patched model's images come from a server
    seed: int = 0
    progress: bool = True
    # Shared across arenas of one concept (the sweep passes one per concept): results that do
    # not depend on the patches, e.g. the base's concept images and transfer searches.
    shared: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.local = LocalGenerator(self.pipe, self.sampling)
        if "original_encoder" not in self.shared:
            encoder = copy.deepcopy(self.pipe.text_encoder).eval().requires_grad_(False)
            self.shared["original_encoder"] = encoder
        self._applied = False

    @property
    def original_encoder(self) -> torch.nn.Module:
        return self.shared["original_encoder"]

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

    @property
    def generator(self) -> LocalGenerator | ServerGenerator:
        """Where the patched model's images come from."""
        return self.remote or self.local

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """The stack applied to the local pipeline for the block."""
        for patch in self.patches:
            patch.apply(self.pipe)
        self._applied = True
        try:
            yield
        finally:
            self._applied = False
            for patch in reversed(self.patches):
                patch.remove(self.pipe)

    @contextlib.contextmanager
    def unpatched(self) -> Iterator[None]:
        """The base model for the block (the stack comes back afterwards if it was on)."""
        applied = self._applied
        if applied:
            for patch in reversed(self.patches):
                patch.remove(self.pipe)
        try:
            yield
        finally:
            if applied:
                for patch in self.patches:
                    patch.apply(self.pipe)

    # --- judging -------------------------------------------------------------------------

    def judge_prompts(
        self, items: list[tuple[Context, str, dict[str, Any]]], base: bool = False
    ) -> tuple[list[Attempt], torch.Tensor]:
        """Generate each (context, prompt text, attempt fields) for every seed, with the
        patched model (or the base), and judge them."""
        if not items:
            return [], torch.empty(0)
        prompts = [text for _, text, _ in items]
        if base:
            with self.unpatched():
                images = self.local.images(prompts)
        else:
            images = self.generator.images(prompts)
        return self.attempts(items, images), images

    def attempts(
        self, items: list[tuple[Context, str, dict[str, Any]]], images: torch.Tensor
    ) -> list[Attempt]:
        verdicts = self.judge(images)
        n = len(self.sampling.seeds)
        out = []
        for i, (context, text, fields) in enumerate(items):
            part = slice(i * n, (i + 1) * n)
            out.append(
                Attempt.judged(
                    context.name,
                    text,
                    _slice_verdicts(verdicts, part),
                    **fields,
                )
            )
        return out

    def probe(
        self,
        ranked: list[tuple[Context, list[tuple[str, dict[str, Any]]]]],
        probes: int,
        seeds: int = 1,
    ) -> list[tuple[Context, str, dict[str, Any]]]:
        """Per context, the candidate to send: of its `probes` best (in the search's own
        ranking), the one the judge recognises in most of `seeds` images drawn with
        PROBE_SEED, PROBE_SEED + 1, ... (the first such in the ranking; with one seed, the
        first recognised), else the best. The attacker checks its candidates before sending
        them, as UnlearnDiffAtk checks its prompts with the classifier; more seeds prefer a
        prompt that draws the concept reliably to one that drew it once. The evaluation's
        seeds are never used."""
        if probes <= 1:
            return [(context, *options[0]) for context, options in ranked]
        tried = [(context, options[:probes]) for context, options in ranked]
        prompts = [text for _, options in tried for text, _ in options]
        seeds = max(1, seeds)
        drawn = self.generator.images(prompts, tuple(PROBE_SEED + i for i in range(seeds)))
        hits = self.judge(drawn).success.reshape(len(prompts), seeds).sum(1).tolist()
        chosen, at = [], 0
        for context, options in tried:
            counts = hits[at : at + len(options)]
            at += len(options)
            index = counts.index(max(counts))
            text, fields = options[index]
            probe = {"tried": len(options), "chosen": index, "recognised": counts[index] > 0}
            if seeds > 1:
                probe.update(seeds=seeds, recognised_in=counts)
            extra = {**fields.get("extra", {}), "probe": probe}
            chosen.append((context, text, {**fields, "extra": extra}))
        return chosen

    # --- the base model's concept images -------------------------------------------------

    def concept_images(self, contexts: tuple[Context, ...], per_context: int) -> ConceptImages:
        """`per_context` base images of each context's concept prompt (seeds 7000+, never
        the evaluation's), decoded and judged; the recognised ones' latents."""
        key = f"concept_images:{[c.name for c in contexts]}:{per_context}"
        if key not in self.shared:
            self.shared[key] = self._concept_images(contexts, per_context)
        return self.shared[key]

    def _concept_images(self, contexts: tuple[Context, ...], per_context: int) -> ConceptImages:
        pipe, s = self.pipe, self.sampling
        seeds = [7000 + i for i in range(per_context)]
        rows = [(c, seed) for c in contexts for seed in seeds]
        with self.unpatched(), torch.no_grad():
            latents = pipe(
                [c.prompt for c, _ in rows],
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                generator=[torch.Generator().manual_seed(seed) for _, seed in rows],
                output_type="latent",
            ).images
            scale = pipe.vae.config.scaling_factor
            images = pipe.vae.decode(latents / scale).sample.clamp(-1, 1)
        keep = self.judge(images).success
        if not keep.any():
            raise AttackSetupError(
                f"the base model draws no recognisable {self.concept.name} for these prompts: "
                "there is nothing to attack toward"
            )
        index = torch.from_numpy(keep)
        return ConceptImages(
            latents[index],
            [c for (c, _), k in zip(rows, keep, strict=True) if k],
            [seed for (_, seed), k in zip(rows, keep, strict=True) if k],
            int((~keep).sum()),
        )


def _slice_verdicts(verdicts, part: slice):
    from erasure.attacks.judging import Verdicts

    return Verdicts(
        verdicts.recognised[part],
        verdicts.degenerate[part],
        verdicts.agree[part],
        verdicts.seen[part],
        {k: v[part] for k, v in verdicts.flags.items()},
    )


def denoising_loss(
    pipe: Any,
    latents: torch.Tensor,
    states: torch.Tensor,
    generator: torch.Generator,
    draws: int,
) -> torch.Tensor:
    """The diffusion training loss of the (patched) U-Net on `latents` [n, c, h, w] with
    token states `states` [n, tokens, width], at `draws` sampled timesteps and noises per
    latent: how well this conditioning explains these images."""
    scheduler = pipe.scheduler
    latents = latents.repeat_interleave(draws, 0)
    states = states.repeat_interleave(draws, 0)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    predicted = pipe.unet(noisy, t, encoder_hidden_states=states).sample
    return torch.nn.functional.mse_loss(predicted, target)
