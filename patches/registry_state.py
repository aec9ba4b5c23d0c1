"""The registry's state document: one JSON object that a write replaces as a whole.

The local backend stores it atomically; the database backend keeps it as rows and assembles
it on demand. Every consistency rule that needs no patch bytes lives here so that each
backend shares it, and so does the change feed's unit, `RegistryChanges`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from patches.errors import InvalidName, RegistryCorrupt
from patches.registry_records import PatchRecord, TenantRecord, check_tenant_name

STATE_FORMAT = 1
_ID = re.compile(r"[0-9a-f]{64}")
_KEYS = {"format", "generation", "patches", "tenants", "versions"}


@dataclass(frozen=True)
class RegistryState:
    generation: int = 0
    patches: dict[str, PatchRecord] = field(default_factory=dict)
    tenants: dict[str, TenantRecord] = field(default_factory=dict)
    # Highest version ever given to each name, so a deleted name@N is never reused for
    # other content.
    versions: dict[str, int] = field(default_factory=dict)

    def next(self, **changes: Any) -> RegistryState:
        """This state with `changes` applied, as written by the next write."""
        return replace(self, generation=self.generation + 1, **changes)

    def next_version(self, name: str) -> int:
        current = max((r.version for r in self.patches.values() if r.name == name), default=0)
        return 1 + max(current, self.versions.get(name, 0))

    def to_json(self) -> bytes:
        document = {
            "format": STATE_FORMAT,
            "generation": self.generation,
            "patches": {pid: record.to_dict() for pid, record in self.patches.items()},
            "tenants": {name: record.to_dict() for name, record in self.tenants.items()},
            "versions": self.versions,
        }
        # Compact on purpose: only then does json use its C encoder (writes stay fast).
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: bytes) -> RegistryState:
        """Parse, refusing anything not exactly as `to_json` writes it (ValueError)."""
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            raise ValueError(f"expected a JSON object with format {STATE_FORMAT}")
        if set(document) != _KEYS:
            raise ValueError(f"expected exactly the keys {', '.join(sorted(_KEYS))}")
        generation = document["generation"]
        if type(generation) is not int or generation < 0:
            raise ValueError("generation must be a non-negative integer")
        patches = {pid: PatchRecord.from_dict(r) for pid, r in document["patches"].items()}
        tenants = {name: TenantRecord.from_dict(r) for name, r in document["tenants"].items()}
        versions = document["versions"]
        if not isinstance(versions, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in versions.items()
        ):
            raise ValueError("versions must map names to integers")
        for pid, record in patches.items():
            if not _ID.fullmatch(pid) or record.id != pid:
                raise ValueError(f"patch key {pid[:70]!r} is not the record's 64-hex id")
        for name, tenant in tenants.items():
            if tenant.tenant != name:
                raise ValueError(f"tenant key {name!r} differs from its record")
        return cls(generation, patches, tenants, versions)


@dataclass(frozen=True)
class RegistryChanges:
    """What a reader at generation `since` needs to reach `generation` (the change feed):
    the records created or changed after `since` and the names or ids removed. `full` means
    the reader cannot be brought forward by a difference (it had nothing, its generation is
    not one this registry can diff from, or the registry was restored): `tenants` and
    `patches` then hold everything, and anything the reader has that they lack is gone."""

    since: int | None
    generation: int
    full: bool = False
    tenants: Mapping[str, TenantRecord] = field(default_factory=dict)
    removed_tenants: frozenset[str] = frozenset()
    patches: Mapping[str, PatchRecord] = field(default_factory=dict)
    removed_patches: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        """Nothing changed: the reader is at the registry's generation already."""
        return not self.full and self.since == self.generation

    @classmethod
    def everything(cls, since: int | None, state: RegistryState) -> RegistryChanges:
        return cls(since, state.generation, True, state.tenants, patches=state.patches)

    def then(self, later: RegistryChanges) -> RegistryChanges:
        """These changes followed by `later` (read from this set's generation): one set from
        `since` to `later.generation`, as if the reader had asked once."""
        if later.since != self.generation and not later.full:
            raise ValueError(
                f"changes from generation {later.since} cannot follow changes up to "
                f"{self.generation}"
            )
        if later.full:
            return later
        if later.empty:
            return self
        tenants = {n: r for n, r in self.tenants.items() if n not in later.removed_tenants}
        patches = {p: r for p, r in self.patches.items() if p not in later.removed_patches}
        tenants.update(later.tenants)
        patches.update(later.patches)
        if self.full:  # everything: nothing to remove, what is gone is simply absent
            return RegistryChanges(self.since, later.generation, True, tenants, patches=patches)
        return RegistryChanges(
            self.since,
            later.generation,
            tenants=tenants,
            removed_tenants=(self.removed_tenants | later.removed_tenants) - later.tenants.keys(),
            patches=patches,
            removed_patches=(self.removed_patches | later.removed_patches) - later.patches.keys(),
        )


def diff_states(old: RegistryState | None, new: RegistryState) -> RegistryChanges:
    """The changes that bring a reader holding `old` to `new` (everything when `old` is
    None, or from another line of generations: not below `new`'s)."""
    if old is None or old.generation > new.generation:
        return RegistryChanges.everything(old.generation if old else None, new)
    if old.generation == new.generation:
        return RegistryChanges(old.generation, new.generation)
    tenants = {n: r for n, r in new.tenants.items() if old.tenants.get(n) != r}
    patches = {p: r for p, r in new.patches.items() if old.patches.get(p) != r}
    return RegistryChanges(
        old.generation,
        new.generation,
        tenants=tenants,
        removed_tenants=frozenset(old.tenants.keys() - new.tenants.keys()),
        patches=patches,
        removed_patches=frozenset(old.patches.keys() - new.patches.keys()),
    )


def apply_changes(state: RegistryState, changes: RegistryChanges) -> RegistryState:
    """`state` brought forward by `changes` (not `full` ones: they carry no version
    counters); a version counter moves with every patch added."""
    if changes.full:
        raise ValueError("a full change set replaces a state; it does not apply to one")
    tenants, patches = dict(state.tenants), dict(state.patches)
    for name in changes.removed_tenants:
        tenants.pop(name, None)
    for pid in changes.removed_patches:
        patches.pop(pid, None)
    tenants.update(changes.tenants)
    patches.update(changes.patches)
    versions = dict(state.versions)
    for record in changes.patches.values():
        versions[record.name] = max(versions.get(record.name, 0), record.version)
    return RegistryState(changes.generation, patches, tenants, versions)


def state_problems(state: RegistryState) -> list[str]:
    """Inconsistencies visible in the state alone (patch files are checked by the backend)."""
    counts = Counter((r.name, r.version) for r in state.patches.values())
    problems = [f"{n}@{v} is registered {c} times" for (n, v), c in counts.items() if c > 1]
    problems += [
        f"{r.ref} is above the highest version recorded for {r.name!r}"
        for r in state.patches.values()
        if r.version > state.versions.get(r.name, 0)
    ]
    for tenant in state.tenants.values():
        problems += _tenant_problems(tenant, state)
    if state.generation < len(state.patches) + len(state.tenants):
        problems.append(
            f"generation {state.generation} is below the number of writes its "
            f"{len(state.patches)} patches and {len(state.tenants)} tenants needed"
        )
    return problems


def require_copyable(state: RegistryState) -> None:
    """RegistryCorrupt naming the first problems of a state that is to be copied whole."""
    problems = state_problems(state)
    if problems:
        raise RegistryCorrupt(
            f"the registry to copy is inconsistent ({len(problems)} problem(s)): "
            + "; ".join(problems[:5])
        )


def _tenant_problems(tenant: TenantRecord, state: RegistryState) -> list[str]:
    problems = []
    try:
        check_tenant_name(tenant.tenant)
    except InvalidName as exc:
        problems.append(str(exc))
    name = tenant.tenant
    missing = [pid[:12] for pid in tenant.stack if pid not in state.patches]
    if missing:
        problems.append(f"tenant {name!r} uses unregistered patch(es) {', '.join(missing)}")
    if not tenant.history or tenant.history[-1].stack != tenant.stack:
        problems.append(f"tenant {name!r}: its last history entry is not its current stack")
    gens = [entry.generation for entry in tenant.history]
    if gens != sorted(set(gens)) or any(g > state.generation for g in gens):
        problems.append(f"tenant {name!r}: history generations are not increasing")
    if not 0 < tenant.generation <= state.generation:
        problems.append(f"tenant {name!r}: generation {tenant.generation} is out of range")
    return problems


def unknown_tenant(tenant: str, tenants: dict[str, TenantRecord]) -> str:
    known = ", ".join(sorted(tenants)[:20]) or "none"
    return f"no tenant {tenant!r}; known tenants: {known}"
