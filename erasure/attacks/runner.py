"""Running attacks on one patch stack and one concept: the registry of attacks with their
budgets, the preparation every run shares (the judge's contrast floor and the plain concept
prompt on the base and the patched model), and the report.

`AttackSuite` holds what stays fixed across stacks (which attacks, their budgets, sampling,
the judges) and keeps per-concept results that do not depend on the defence (the base's
concept images, transfer searches), so a sweep over many defences pays for them once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from erasure.attacks import control, inversion, paraphrase, ring_a_bell, unlearndiff
from erasure.attacks.arena import Arena
from erasure.attacks.concepts import AttackConcept
from erasure.attacks.generation import Sampling, ServerGenerator
from erasure.attacks.judging import ConceptJudge
from erasure.attacks.results import AttackResult
from erasure.attacks.tokens import AttackSetupError, attack_vocabulary


@dataclass(frozen=True)
class AttackKind:
    name: str
    flag_prefix: str  # budget flags: --<prefix>-<field>
    budget: type
    run: Callable[[Arena, Any], AttackResult]
    hosted: bool  # a tenant sending text can run it (else: reported separately)
    searches: bool  # a search that must succeed on the base model (calibration)
    help: str
    reads_stack: bool = False  # searches the patched model itself (white-box)


ATTACKS: dict[str, AttackKind] = {
    kind.name: kind
    for kind in (
        AttackKind(
            "random-tokens",
            "rnd",
            control.RandomBudget,
            control.run,
            True,
            False,
            "control: random token sequences, no search (what any text gets for free)",
        ),
        AttackKind(
            "paraphrase",
            "para",
            paraphrase.ParaphraseBudget,
            paraphrase.run,
            True,
            False,
            "synonyms, descriptions, misspellings, joins, other languages",
        ),
        AttackKind(
            "ring-a-bell",
            "rab",
            ring_a_bell.RingABellBudget,
            lambda arena, budget: ring_a_bell.run(arena, budget, adaptive=False),
            True,
            True,
            "genetic token search on the ORIGINAL encoder (transfer)",
        ),
        AttackKind(
            "ring-a-bell-adaptive",
            "rab",
            ring_a_bell.RingABellBudget,
            lambda arena, budget: ring_a_bell.run(arena, budget, adaptive=True),
            True,
            True,
            "the same search on the PATCHED encoder",
            reads_stack=True,
        ),
        AttackKind(
            "unlearndiff",
            "uda",
            unlearndiff.UnlearnDiffBudget,
            unlearndiff.run,
            True,
            True,
            "prefix tokens optimised through the patched model's denoising loss",
            reads_stack=True,
        ),
        AttackKind(
            "inversion",
            "ti",
            inversion.InversionBudget,
            inversion.run,
            False,
            True,
            "a learned token embedding (not a hosted-tenant threat)",
            reads_stack=True,
        ),
    )
}
DEFAULT_ATTACKS = (
    "random-tokens",
    "paraphrase",
    "ring-a-bell",
    "ring-a-bell-adaptive",
    "unlearndiff",
    "inversion",
)


def attack_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return list(DEFAULT_ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise AttackSetupError(
            f"unknown attack {unknown[0] if unknown else spec!r}: choose from "
            f"{', '.join(ATTACKS)} or all"
        )
    return names


def add_budget_flags(parser: argparse.ArgumentParser) -> None:
    """--<prefix>-<field> for every budget field (the defaults are the budget's)."""
    done = set()
    for kind in ATTACKS.values():
        if kind.flag_prefix in done:
            continue
        done.add(kind.flag_prefix)
        group = parser.add_argument_group(f"{kind.flag_prefix}: {kind.budget.__name__}")
        for item in fields(kind.budget):
            flag = f"--{kind.flag_prefix}-{item.name.replace('_', '-')}"
            kind_of = {"int": int, "float": float}.get(str(item.type), str)
            group.add_argument(flag, type=kind_of, default=None, help=f"default {item.default}")


def budgets_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Per flag prefix, the budget with any flags given."""
    out = {}
    for kind in ATTACKS.values():
        changes = {}
        for item in fields(kind.budget):
            value = getattr(args, f"{kind.flag_prefix}_{item.name}", None)
            if value is not None:
                changes[item.name] = value
        out[kind.flag_prefix] = replace(kind.budget(), **changes)
    return out


@dataclass
class AttackSuite:
    names: list[str]
    budgets: dict[str, Any]  # per flag prefix
    sampling: Sampling
    judge_files: list[Path]
    ban_concept_words: bool = True
    words_only: bool = True
    seed: int = 0
    progress: bool = False
    # A folder keeping the defence-independent transfer searches across runs (the sweep's).
    store: Path | None = None
    _shared: dict[str, dict[str, Any]] = field(default_factory=dict)

    def arena(
        self, pipe: Any, patches: list, concept: AttackConcept, remote: ServerGenerator | None
    ) -> Arena:
        judge = ConceptJudge.load(self.judge_files, concept.name)
        banned = concept.spec.words if self.ban_concept_words else ()
        vocabulary = attack_vocabulary(pipe.tokenizer, banned, self.words_only)
        if concept.name not in self._shared:
            self._shared[concept.name] = self._load(concept.name)
        shared = self._shared[concept.name]
        return Arena(
            pipe,
            patches,
            concept,
            judge,
            self.sampling,
            vocabulary,
            remote,
            self.seed,
            self.progress,
            shared,
        )

    def run(
        self,
        pipe: Any,
        patches: list,
        concept: AttackConcept,
        remote: ServerGenerator | None = None,
        on_result: Callable[[AttackResult], None] | None = None,
    ) -> tuple[dict[str, Any], list[AttackResult]]:
        """Every attack of the suite on `patches` (applied to `pipe` meanwhile): the report
        and the results (with their images)."""
        started = time.perf_counter()
        self.check(remote is not None, bool(patches))
        arena = self.arena(pipe, patches, concept, remote)
        direct = self._direct(arena)
        results = []
        with arena.patched():
            direct["patched"] = self._direct_patched(arena)
            for name in self.names:
                kind = ATTACKS[name]
                result = kind.run(arena, self.budgets[kind.flag_prefix])
                results.append(result)
                if on_result:
                    on_result(result)
        self._save(concept.name, arena.shared)
        report = {
            "direct": direct,
            "attacks": {r.attack: r.record() for r in results},
            "vocabulary": arena.vocabulary.record(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        return report, results

    def check(self, remote: bool, patches: bool) -> None:
        """White-box attacks search the patched model itself: against a server, the stack's
        patch files must also be given (the tenant owns them)."""
        needing = [n for n in self.names if ATTACKS[n].reads_stack]
        if remote and not patches and needing:
            raise AttackSetupError(
                f"{', '.join(needing)} search the patched model itself: give the stack's patch "
                "files with --patch as well as --server (the tenant owns its patches)"
            )

    def _store_file(self, concept: str) -> Path | None:
        return None if self.store is None else self.store / f"searches-{concept}.json"

    def _load(self, concept: str) -> dict[str, Any]:
        path = self._store_file(concept)
        if path is None or not path.exists():
            return {}
        records = json.loads(path.read_text())
        return {k: ring_a_bell.Found.from_record(v) for k, v in records.items()}

    def _save(self, concept: str, shared: dict[str, Any]) -> None:
        path = self._store_file(concept)
        if path is None:
            return
        from patches.atomic import atomic_write_json

        found = {k: v.record() for k, v in shared.items() if k.startswith(ring_a_bell.TRANSFER)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, found)

    def _direct(self, arena: Arena) -> dict[str, Any]:
        """The concept's own prompt in every context on the base model (the judge's contrast
        floor comes from these images)."""
        key = "direct_base"
        if key not in arena.shared:
            with arena.unpatched():
                images = arena.local.images([c.prompt for c in arena.concept.contexts])
            arena.judge.calibrate(images)
            arena.shared[key] = (arena.judge.reference, float(arena.judge(images).success.mean()))
        arena.judge.reference, rate = arena.shared[key]
        return {"base": rate}

    def _direct_patched(self, arena: Arena) -> float:
        """The concept's own prompt on the patched model: 1 - UA, the attack-free baseline."""
        items = [(c, c.prompt, {}) for c in arena.concept.contexts]
        attempts, _ = arena.judge_prompts(items)
        hits = [s for a in attempts for s in a.success]
        return sum(hits) / len(hits)

    def record(self) -> dict[str, Any]:
        used = {ATTACKS[n].flag_prefix for n in self.names}
        return {
            "attacks": self.names,
            "budgets": {p: asdict(b) for p, b in self.budgets.items() if p in used},
            "sampling": self.sampling.record(),
            # By content: the same judges give the same key (and stored results) whichever
            # path or working directory names them.
            "judges": [
                {"file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                for f in self.judge_files
            ],
            "ban_concept_words": self.ban_concept_words,
            "words_only": self.words_only,
            "seed": self.seed,
        }
