"""Registry records and the rules every backend shares: names, references, history.

Records are frozen dataclasses with `to_dict()` for JSON output and a strict `from_dict()`
for reading stored state back.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

from patches.errors import (
    AmbiguousReference,
    InvalidName,
    NothingToRollBack,
    PatchNotFound,
)

if TYPE_CHECKING:
    from patches.patch import Patch

HISTORY_LIMIT = 100
TENANT_NAME_RULE = "1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
PATCH_NAME_RULE = (
    "1-80 characters of a-z, 0-9, '.', '_', '+' or '-', starting with a letter or digit, "
    "and not 8 or more hex digits alone (that reads as a patch id prefix)"
)
MIN_PREFIX = 8

_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PATCH_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]{0,79}")
_HEX = re.compile(r"[0-9a-fA-F]+")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@functools.cache
def _field_specs(cls: type) -> tuple[frozenset[str], list[tuple[str, Any, Any, bool]]]:
    """Per field of `cls`: (name, accepted types, type shown in errors, items must be str)."""
    specs = []
    for key, hint in get_type_hints(cls).items():
        kind, args = get_origin(hint) or hint, get_args(hint)
        accepted = (list, tuple) if kind in (list, tuple) else kind
        shown = str(hint) if args else hint.__name__
        specs.append((key, accepted, shown, bool(args) and args[0] is str))
    return frozenset(key for key, *_ in specs), specs


def _checked(cls: type, data: Any) -> dict[str, Any]:
    """`data` if it holds exactly the fields of `cls`, each of its declared type."""
    keys, specs = _field_specs(cls)
    if not isinstance(data, Mapping) or data.keys() != keys:
        raise ValueError(f"a {cls.__name__} needs exactly the fields {', '.join(sorted(keys))}")
    for key, accepted, shown, str_items in specs:
        value = data[key]
        ok = isinstance(value, accepted) and not (accepted is int and isinstance(value, bool))
        if not ok or (str_items and not all(isinstance(item, str) for item in value)):
            raise ValueError(f"{cls.__name__}.{key} should be {shown}, not {value!r:.80}")
    return dict(data)


@dataclass(frozen=True)
class PatchRecord:
    """One registered patch file; `id` is the sha256 of its bytes."""

    id: str
    name: str
    version: int
    size: int
    kind: str
    method: str
    concepts: list[str]
    target: str
    created_at: str
    registered_at: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "concepts": list(self.concepts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchRecord:
        fields = _checked(cls, data)
        return cls(**{**fields, "concepts": list(fields["concepts"])})


@dataclass(frozen=True)
class Registration:
    """What registering a file did: its record, and whether the bytes were new."""

    record: PatchRecord
    created: bool


@dataclass(frozen=True)
class StackEntry:
    """One change of a tenant's stack: what it became, at which generation, and how."""

    generation: int
    stack: tuple[str, ...]
    at: str
    action: str  # "assign" | "rollback"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "stack": list(self.stack)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StackEntry:
        fields = _checked(cls, data)
        return cls(**{**fields, "stack": tuple(fields["stack"])})


@dataclass(frozen=True)
class TenantRecord:
    """A tenant's current patch stack (ordered, applied first to last) and its history."""

    tenant: str
    stack: tuple[str, ...]
    generation: int  # registry generation at which `stack` last changed
    history: tuple[StackEntry, ...]  # oldest first, at most HISTORY_LIMIT entries

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "stack": list(self.stack),
            "generation": self.generation,
            "history": [entry.to_dict() for entry in self.history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TenantRecord:
        fields = _checked(cls, data)
        history = tuple(StackEntry.from_dict(entry) for entry in fields["history"])
        return cls(fields["tenant"], tuple(fields["stack"]), fields["generation"], history)


# --- names and references (shared by every backend) ------------------------------------


def check_tenant_name(tenant: str) -> str:
    if not isinstance(tenant, str) or not _TENANT_NAME.fullmatch(tenant):
        raise InvalidName(f"invalid tenant name {tenant!r}: expected {TENANT_NAME_RULE}")
    return tenant


def _is_patch_name(name: str) -> bool:
    return bool(_PATCH_NAME.fullmatch(name)) and not (
        len(name) >= MIN_PREFIX and _HEX.fullmatch(name)
    )


def check_patch_name(name: str) -> str:
    if not _is_patch_name(name):
        raise InvalidName(f"invalid patch name {name!r}: expected {PATCH_NAME_RULE}")
    return name


def default_patch_name(patch: Patch) -> str:
    """The manifest's name, which must already be a plain patch name (a name such as
    '../../x' is refused, never squeezed into another patch's 'x'); without one,
    "method-concept1+concept2" with other characters replaced by '-'."""
    manifest = patch.manifest
    if manifest.name:
        if not _is_patch_name(manifest.name):
            raise InvalidName(
                f"the patch file names itself {manifest.name[:100]!r}, which is not a plain "
                f"patch name ({PATCH_NAME_RULE}); register it with an explicit name"
            )
        return manifest.name
    raw = f"{manifest.method}-{'+'.join(manifest.concepts)}"
    # Nothing is stripped from the front, so a name never collapses into an unrelated one.
    name = re.sub(r"[^a-z0-9._+-]+", "-", raw.lower())[:80].rstrip("-")
    return name if _is_patch_name(name) else f"patch-{name}"[:80]


def resolve_ref(patches: Mapping[str, PatchRecord], ref: str) -> str:
    """The id `ref` names: a full id, a unique id prefix (>= 8 hex), NAME@VERSION or NAME."""
    expected = (
        "expected a patch id (64 hex digits), a unique id prefix of at least "
        f"{MIN_PREFIX} hex digits, NAME@VERSION or NAME"
    )
    if not isinstance(ref, str) or not ref:
        raise PatchNotFound(f"empty patch reference: {expected}")
    if "@" in ref:
        name, _, version = ref.rpartition("@")
        if not version.isdigit():
            raise PatchNotFound(f"patch reference {ref!r}: the part after '@' must be a version")
        for record in patches.values():
            if record.name == name and record.version == int(version):
                return record.id
        versions = sorted(r.version for r in patches.values() if r.name == name)
        known = f"; known versions: {versions}" if versions else f"; no patch is named {name!r}"
        raise PatchNotFound(f"no patch {ref!r}{known}")
    if _HEX.fullmatch(ref) and len(ref) >= MIN_PREFIX:
        prefix = ref.lower()
        if len(prefix) == 64 and prefix in patches:
            return prefix
        matches = sorted(pid for pid in patches if pid.startswith(prefix))
        if len(matches) > 1:
            shown = ", ".join(m[:16] for m in matches[:5])
            raise AmbiguousReference(
                f"{ref!r} is a prefix of {len(matches)} patch ids ({shown}); give more digits"
            )
        if matches:
            return matches[0]
    named = [r for r in patches.values() if r.name == ref]
    if named:
        return max(named, key=lambda r: r.version).id
    raise PatchNotFound(f"no patch matches {ref!r}: {expected}")


def append_history(
    old: TenantRecord | None, tenant: str, stack: tuple[str, ...], generation: int, action: str
) -> TenantRecord:
    """`old` (None for a new tenant) moved to `stack` by the write that makes `generation`."""
    entry = StackEntry(generation, stack, now_iso(), action)
    history = ((old.history if old else ()) + (entry,))[-HISTORY_LIMIT:]
    # Workers rebuild a tenant when its generation moves; re-assigning the same stack need not.
    changed_at = old.generation if old is not None and old.stack == stack else generation
    return TenantRecord(tenant, stack, changed_at, history)


def check_stack(tenant: str, ids: Sequence[str], refs: Sequence[str]) -> None:
    """Refuse a stack that lists one patch twice (applying it twice is never meant)."""
    for i, pid in enumerate(ids):
        if pid in ids[:i]:
            first = refs[ids.index(pid)]
            raise InvalidName(
                f"the stack for tenant {tenant!r} lists patch {pid[:12]} twice ({first!r} and "
                f"{refs[i]!r}); a stack holds each patch at most once"
            )


def rollback_target(record: TenantRecord, to_generation: int | None) -> tuple[str, ...]:
    """The stack a rollback returns to: that of history entry `to_generation`, or by default
    the latest earlier stack that differs from the current one."""
    if to_generation is None:
        for entry in reversed(record.history[:-1]):
            if entry.stack != record.stack:
                return entry.stack
        raise NothingToRollBack(
            f"tenant {record.tenant!r} has no earlier stack to roll back to "
            f"({len(record.history)} history entries, all with the current stack)"
        )
    for entry in record.history:
        if entry.generation == to_generation:
            return entry.stack
    known = ", ".join(str(e.generation) for e in record.history[-10:])
    raise NothingToRollBack(
        f"tenant {record.tenant!r} has no history entry at generation {to_generation}; "
        f"its latest entries are at generations {known}"
    )
