"""Ring-A-Bell: a genetic search for a token sequence whose text encoding lands where a benign
prompt plus the concept would.

- Concept vector c (from the ORIGINAL encoder, always): the token-wise mean over prompt pairs
  of E0(prompt with the concept) - E0(the same prompt with its anchor), a [tokens x width]
  tensor.
- Target per context: T = E0(benign prompt) + eta * c.
- Search: K token ids (from the attack vocabulary: no concept words, whole words only by
  default), fitness ||T - E(ids)||^2 (mean over positions and width); a population, the
  best half kept each generation, children by one-point crossover (probability `crossover`,
  else a copy of one parent) and a mutation (probability `mutation`: one position gets a
  random token).
- Transfer variant: E = the original encoder (what an attacker with the public base model
  can run; the defence never enters the search). Adaptive variant: E = the patched encoder.

The best sequence per context is decoded to text; that text is what is sent and judged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from erasure.attacks.arena import Arena
from erasure.attacks.results import AttackResult
from erasure.attacks.tokens import as_text, prompt_ids, sequence_ids, states
from erasure.prompts import ConceptSpec, pairs


@dataclass(frozen=True)
class RingABellBudget:
    # Published: K = 16/38/75 of CLIP's 77 positions, population 200, 3000 generations,
    # eta ~3 (nudity). MiniCanvas (32 positions, prompts of ~9 tokens): K = 8 reached circle
    # in 14 of 16 base images against 12 of 16 for K = 16 at 300 generations, and eta 3
    # put the target far from any prompt (fitness 2.5 against 0.2 for the concept's own
    # prompt at eta 1) and found nothing.
    tokens: int = 8
    population: int = 64
    generations: int = 200
    eta: float = 1.0
    crossover: float = 0.5
    mutation: float = 0.25  # per child: one position gets a random token
    contexts: int = 4  # benign prompts searched from (0: all)
    # Distinct best sequences per context the attacker tries with the judge before sending
    # one (Arena.probe; 1: send the best by fitness unchecked).
    probes: int = 5
    # Images per candidate in that check (seeds 9000, 9001, ...): the most recognised wins.
    probe_seeds: int = 4
    # Independent populations (seeds seed, seed + 1, ...), each one's best offered before
    # any one's second: one converged population's best few are near-copies of each other.
    # On the MiniCanvas base (8 objects) 1 population unprobed reached 71.9%, 3 populations
    # with 3 candidates on 4 probe seeds 79.7%, 5 with 5 85.9%.
    restarts: int = 5


def concept_vector(
    encoder: torch.nn.Module, tokenizer, spec: ConceptSpec, templates: tuple[str, ...]
) -> torch.Tensor:
    """[tokens, width]: mean of E0(with concept) - E0(with anchor) over the template pairs."""
    found = pairs(spec, templates)
    with_states = states(encoder, prompt_ids(tokenizer, [a for a, _ in found]))
    without_states = states(encoder, prompt_ids(tokenizer, [b for _, b in found]))
    return (with_states - without_states).mean(0)


def search_targets(
    encoder: torch.nn.Module,
    tokenizer,
    spec: ConceptSpec,
    templates: tuple[str, ...],
    benign: list[str],
    eta: float,
) -> torch.Tensor:
    """[len(benign), tokens, width]: T = E0(benign prompt) + eta * c, E0 the original."""
    start = states(encoder, prompt_ids(tokenizer, benign))
    return start + eta * concept_vector(encoder, tokenizer, spec, templates)


@dataclass
class Found:
    ids: torch.Tensor  # [contexts, K] token ids, the best per context
    fitness: list[float]
    start_fitness: list[float]
    seconds: float
    ranked: list[list[list[int]]] | None = None  # per context: the best distinct sequences
    ranked_fitness: list[list[float]] | None = None

    def record(self) -> dict:
        return {
            "ids": self.ids.tolist(),
            "fitness": self.fitness,
            "start_fitness": self.start_fitness,
            "seconds": self.seconds,
            "ranked": self.ranked,
            "ranked_fitness": self.ranked_fitness,
        }

    @classmethod
    def from_record(cls, record: dict) -> Found:
        ids = torch.tensor(record["ids"], dtype=torch.long)
        return cls(
            ids,
            record["fitness"],
            record["start_fitness"],
            record["seconds"],
            record.get("ranked"),
            record.get("ranked_fitness"),
        )

    def candidates(self, context: int) -> list[tuple[list[int], float]]:
        """The context's ranked distinct sequences with their fitness, best first."""
        if self.ranked is None or self.ranked_fitness is None:
            return [(self.ids[context].tolist(), self.fitness[context])]
        return list(zip(self.ranked[context], self.ranked_fitness[context], strict=True))


def genetic_search(
    encoder: torch.nn.Module,
    tokenizer,
    vocabulary: torch.Tensor,
    targets: torch.Tensor,
    budget: RingABellBudget,
    seed: int,
    progress: bool = False,
    keep: int = 1,
) -> Found:
    """One population per target ([contexts, tokens, width]) and restart, searched side by
    side; `keep` distinct best sequences per target are ranked in the result: over
    restarts, every population's best (by fitness) before any population's second."""
    runs = [
        _population_search(
            encoder, tokenizer, vocabulary, targets, budget, seed + r, progress, keep
        )
        for r in range(max(1, budget.restarts))
    ]
    if len(runs) == 1:
        return runs[0]
    ranked, ranked_fitness = [], []
    for c in range(len(targets)):
        # Each population's best first (by fitness), then each one's second, ...: the
        # candidates differ as the populations do.
        pooled = sorted(
            (rank, f, ids) for run in runs for rank, (ids, f) in enumerate(run.candidates(c))
        )
        distinct, values = _first_distinct(((ids, f) for _, f, ids in pooled), keep)
        ranked.append(distinct)
        ranked_fitness.append(values)
    return Found(
        torch.tensor([r[0] for r in ranked], dtype=torch.long),
        [v[0] for v in ranked_fitness],
        [min(run.start_fitness[c] for run in runs) for c in range(len(targets))],
        sum(run.seconds for run in runs),
        ranked,
        ranked_fitness,
    )


def _first_distinct(
    candidates: Iterable[tuple[list[int], float]], keep: int
) -> tuple[list[list[int]], list[float]]:
    """The first `keep` distinct sequences of `candidates` (best first) and their fitness."""
    distinct: list[list[int]] = []
    values: list[float] = []
    for sequence, fitness in candidates:
        if sequence not in distinct:
            distinct.append(sequence)
            values.append(fitness)
            if len(distinct) == keep:
                break
    return distinct, values


def _population_search(
    encoder: torch.nn.Module,
    tokenizer,
    vocabulary: torch.Tensor,
    targets: torch.Tensor,
    budget: RingABellBudget,
    seed: int,
    progress: bool,
    keep: int,
) -> Found:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    contexts, size, k = len(targets), budget.population, budget.tokens
    vocab = len(vocabulary)

    def fitness(population: torch.Tensor) -> torch.Tensor:
        """population [contexts, n, K] vocabulary indices -> [contexts, n]"""
        n = population.shape[1]
        ids = sequence_ids(tokenizer, vocabulary[population.reshape(-1, k)])
        encoded = states(encoder, ids).reshape(contexts, n, *targets.shape[1:])
        return (encoded - targets[:, None]).pow(2).mean((-1, -2))

    population = torch.randint(vocab, (contexts, size, k), generator=generator)
    scores = fitness(population)
    start = scores.min(1).values
    elites = size // 2
    children = size - elites
    rows = torch.arange(contexts)[:, None]
    for _ in tqdm(range(budget.generations), desc="Ring-A-Bell", disable=not progress):
        order = scores.argsort(1)[:, :elites]
        elite, elite_scores = population[rows, order], scores[rows, order]
        first = elite[rows, torch.randint(elites, (contexts, children), generator=generator)]
        second = elite[rows, torch.randint(elites, (contexts, children), generator=generator)]
        point = torch.randint(1, k, (contexts, children, 1), generator=generator)
        crossed = torch.where(torch.arange(k) < point, first, second)
        cross = torch.rand(contexts, children, 1, generator=generator) < budget.crossover
        child = torch.where(cross, crossed, first)
        mutate = torch.rand(contexts, children, generator=generator) < budget.mutation
        where = torch.randint(k, (contexts, children), generator=generator)
        tokens = torch.randint(vocab, (contexts, children), generator=generator)
        at = torch.nn.functional.one_hot(where, k).bool() & mutate[..., None]
        child = torch.where(at, tokens[..., None], child)
        population = torch.cat([elite, child], 1)
        scores = torch.cat([elite_scores, fitness(child)], 1)
    best = scores.argmin(1)
    ranked, ranked_fitness = [], []
    for c in range(contexts):
        ordered = (
            (vocabulary[population[c, i]].tolist(), float(scores[c, i]))
            for i in scores[c].argsort().tolist()
        )
        distinct, values = _first_distinct(ordered, keep)
        ranked.append(distinct)
        ranked_fitness.append(values)
    return Found(
        vocabulary[population[torch.arange(contexts), best]],
        scores[torch.arange(contexts), best].tolist(),
        start.tolist(),
        time.perf_counter() - started,
        ranked,
        ranked_fitness,
    )


def _targets(arena: Arena, budget: RingABellBudget) -> torch.Tensor:
    contexts = arena.concept.first(budget.contexts)
    concept = arena.concept
    return search_targets(
        arena.original_encoder,
        arena.tokenizer,
        concept.spec,
        concept.templates,
        [c.benign for c in contexts],
        budget.eta,
    )


TRANSFER = "ring-a-bell-transfer"


def transfer_key(arena: Arena, budget: RingABellBudget) -> str:
    """What a transfer search depends on (never the defence)."""
    contexts = [c.benign for c in arena.concept.first(budget.contexts)]
    return f"{TRANSFER}:{asdict(budget)}:{contexts}:{arena.vocabulary.record()}:{arena.seed}"


def run(arena: Arena, budget: RingABellBudget, adaptive: bool) -> AttackResult:
    started = time.perf_counter()
    name = "ring-a-bell-adaptive" if adaptive else "ring-a-bell"
    contexts = arena.concept.first(budget.contexts)
    key = transfer_key(arena, budget)
    # A stack that leaves the text encoder alone has the original encoder: the adaptive
    # search is the transfer search.
    edits_encoder = any(p.manifest.target.component == "text_encoder" for p in arena.patches)
    adaptive = adaptive and edits_encoder
    reused = not adaptive and key in arena.shared
    encoder = arena.pipe.text_encoder if adaptive else arena.original_encoder
    if reused:
        found = arena.shared[key]  # the transfer search never sees the defence
    else:
        found = genetic_search(
            encoder,
            arena.tokenizer,
            arena.vocabulary.ids,
            _targets(arena, budget),
            budget,
            arena.seed,
            arena.progress,
            keep=max(1, budget.probes),
        )
        if not adaptive:
            arena.shared[key] = found
    ranked = []
    for i, context in enumerate(contexts):
        options = []
        for rank, (sequence, fitness) in enumerate(found.candidates(i)):
            text = as_text(arena.tokenizer, sequence)
            extra = {"benign": context.benign, "fitness": fitness, "rank": rank}
            fields = {"ids": text.ids, "round_trips": text.round_trips, "extra": extra}
            options.append((text.text, fields))
        ranked.append((context, options))
    evaluating = time.perf_counter()
    items = arena.probe(ranked, budget.probes, budget.probe_seeds)
    attempts, images = arena.judge_prompts(items)
    seconds = {
        "search": 0.0 if reused else found.seconds,
        "evaluate": time.perf_counter() - evaluating,
        "total": time.perf_counter() - started,
    }
    result = AttackResult(name, "hosted", asdict(budget), attempts, seconds, images)
    result.details = {
        "fitness_start": found.start_fitness,
        "fitness_end": found.fitness,
        "search_encoder": "patched" if adaptive else "original",
        "search_reused": reused,
        "search_seconds": found.seconds,
        "vocabulary": arena.vocabulary.record(),
    }
    return result
