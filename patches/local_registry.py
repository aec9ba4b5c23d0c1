"""`LocalRegistry`: the registry kept in one local (or shared-volume) directory.

Layout:

    DIR/state.json                the single source of truth, replaced atomically:
                                  {"format": 1, "generation": N,
                                   "patches": {id: record}, "tenants": {name: record}}
    DIR/blobs/<id>.safetensors    immutable, content-addressed patch files (id = sha256)
    DIR/tmp/                      temp files for atomic writes (same filesystem)
    DIR/lock                      the writers' lock file
    DIR/registry.json             the marker: this registry exists (patches/registry_marker.py)

A registry is created once, explicitly, in a location that holds no registry (state first,
then the marker). From then on a missing state.json is an error for every reader and writer
(`RegistryStateMissing`): never an empty registry, and never re-initialised over the patch
files and marker of one that existed. `recover` puts a copy of the state back.

Writers take an exclusive `flock` on DIR/lock, re-read state.json under it, write any new
blob (temp file, fsync, rename, fsync dir) BEFORE the state.json that refers to it, then
replace state.json the same way. A crash at any point leaves the old state or the new one;
a blob no record names is an invisible, harmless orphan that the next put of the same bytes
rewrites. Leftover temp files can only come from a crashed writer, so each writer clears
DIR/tmp once it holds the lock. Deleting a patch drops its record first, then its blob.

Readers never lock: rename makes every state.json they open a whole one. They cache the
parsed state keyed by the file's (inode, mtime, size), so `generation()` costs one `stat`;
for a second after each write (see RACY_NS) they re-read the bytes, parsing only on change.

Messages name files relative to the registry (`blobs/<id>.safetensors`), never by absolute
path: they reach tenants inside 503 answers.
"""

from __future__ import annotations

import fcntl
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from patches.atomic import atomic_write_bytes
from patches.errors import (
    PatchExists,
    PatchInUse,
    PatchNotFound,
    RegistryCorrupt,
    RegistryError,
    RegistryExists,
    RegistryStateMissing,
    RegistryUnreadable,
    TenantNotFound,
)
from patches.registry import Registry
from patches.registry_blobs import BlobStore, check_file
from patches.registry_marker import MARKER_NAME, RegistryMarker, read_marker, write_marker
from patches.registry_records import (
    PatchRecord,
    Registration,
    TenantRecord,
    append_history,
    check_patch_name,
    check_stack,
    check_tenant_name,
    default_patch_name,
    now_iso,
    resolve_ref,
    rollback_target,
)
from patches.registry_state import (
    RegistryChanges,
    RegistryState,
    diff_states,
    require_copyable,
    state_problems,
    unknown_tenant,
)

if TYPE_CHECKING:
    from patches.patch import Patch
    from patches.patch_file import FileLimits

# A stat key read this soon after its file's mtime is not trusted: on filesystems with coarse
# timestamps a second write in the same tick can keep (reused inode, mtime, size).
RACY_NS = 1_000_000_000


@dataclass(frozen=True)
class _Cached:
    """The last state.json read: its stat key, bytes and parsed state."""

    key: tuple[int, int, int]
    text: bytes
    state: RegistryState
    # Whether a later write must change `key`: only when the file was old enough at the read.
    trusted: bool


class LocalRegistry(Registry):
    """A registry in directory `root`; safe for many processes. With `create`, a location
    that holds no registry (missing or empty) gets a new, empty one."""

    def __init__(
        self, root: str | os.PathLike, limits: FileLimits | None = None, create: bool = True
    ) -> None:
        self.root = Path(root)
        self.limits = limits
        self._state_path = self.root / "state.json"
        self._marker_path = self.root / MARKER_NAME
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._lock_path = self.root / "lock"
        self.blobs = BlobStore(self._blobs, self._tmp, limits)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry location {self.root} exists and is not a directory")
        # Replaced whole, never changed, so reader threads always see a coherent entry.
        self._cache: _Cached | None = None
        # The state the change feed last answered with: what it diffs the next one from.
        self._feed_base: RegistryState | None = None
        if create and not self._state_path.exists():
            self._make_directories()
            with self._locked():
                if not self._state_path.exists() and not self._has_existed():
                    self._initialise()

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    # --- existence ----------------------------------------------------------------------

    def _make_directories(self) -> None:
        for directory in (self.root, self._blobs, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)

    def _has_existed(self) -> bool:
        return self._marker_path.exists() or self.blobs.count() > 0

    def _initialise(self) -> None:
        """Write the state of a new registry, then its marker (under the lock)."""
        atomic_write_bytes(self._state_path, RegistryState().to_json(), tmp_dir=self._tmp)
        write_marker(self._marker_path, RegistryMarker(now_iso(), 0), self._tmp)

    def _missing_state(self) -> RegistryStateMissing:
        blobs, marker = self.blobs.count(), self._marker_path.exists()
        if not blobs and not marker:
            return RegistryStateMissing(
                "there is no registry here (no state.json, marker or patch files); create one "
                "with `conceptguard registry init`"
            )
        found = f"its {MARKER_NAME} marker" if marker else "no marker"
        return RegistryStateMissing(
            f"the registry's state.json is missing, but a registry exists here ({found}, "
            f"{blobs} patch file(s) in blobs/): nothing is served or changed rather than "
            "starting an empty registry. Put state.json back, or restore a copy with "
            "`conceptguard registry recover --from FILE`"
        )

    def create(self) -> None:
        self._make_directories()
        with self._locked():
            if self._state_path.exists():
                raise RegistryExists("a registry exists here already")
            if self._has_existed():
                raise self._missing_state()
            self._initialise()

    def recover(self, document: bytes) -> RegistryState:
        try:
            restored = RegistryState.from_json(document)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryCorrupt(
                f"the file to recover from is not a registry state: {exc}"
            ) from None
        with self._locked():
            if self._state_path.exists():
                raise RegistryExists(
                    "the registry's state.json is present; recover only restores a missing one"
                )
            # Its own consistency only: a damaged patch file fails its tenants closed once
            # restored (and `check` names it), which beats failing every tenant.
            problems = state_problems(restored)
            if problems:
                raise RegistryCorrupt(
                    f"the state cannot be restored ({len(problems)} problem(s)): "
                    + "; ".join(problems[:5])
                )
            marker = read_marker(self._marker_path)
            # Above every generation issued here, so no worker mistakes it for one it has.
            issued = max(restored.generation, marker.generation if marker else 0)
            state = replace(restored, generation=issued + 1)
            self._save(state)
        return state

    # --- reading ------------------------------------------------------------------------

    def _read_state(self, trust_stat: bool = False) -> RegistryState:
        """The state on disk. With `trust_stat`, an unchanged stat key skips the read; in any
        case unchanged bytes skip the parse."""
        try:
            st = os.stat(self._state_path)
            key, cached = (st.st_ino, st.st_mtime_ns, st.st_size), self._cache
            if trust_stat and cached is not None and cached.trusted and cached.key == key:
                return cached.state
            read_at = time.time_ns()
            with open(self._state_path, "rb") as handle:
                st = os.fstat(handle.fileno())
                text = handle.read()
        except FileNotFoundError:
            raise self._missing_state() from None
        except OSError as exc:
            raise RegistryUnreadable(
                f"the registry's state.json cannot be read: {exc.strerror}"
            ) from None
        if cached is not None and cached.text == text:
            state = cached.state
        else:
            try:
                state = RegistryState.from_json(text)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise RegistryCorrupt(
                    f"the registry's state.json is not a valid registry state: {exc}"
                ) from exc
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._cache = _Cached(key, text, state, read_at - st.st_mtime_ns > RACY_NS)
        return state

    def _snapshot(self) -> RegistryState:
        return self._read_state(trust_stat=True)

    def snapshot(self) -> RegistryState:
        return self._snapshot()

    def generation(self) -> int:
        return self._snapshot().generation

    def changes_since(self, generation: int | None) -> RegistryChanges:
        """By diffing the state read now against the one this object last answered with
        (state.json holds no history of changes): what changed costs a read and a compare of
        the whole state, paid only when the generation moved."""
        state = self._snapshot()
        if generation == state.generation:
            return RegistryChanges(generation, generation)
        base, self._feed_base = self._feed_base, state
        if base is None or base.generation != generation:
            return RegistryChanges.everything(generation, state)
        return diff_states(base, state)

    def resolve(self, ref: str) -> str:
        return resolve_ref(self._snapshot().patches, ref)

    def patch_record(self, ref: str) -> PatchRecord:
        patches = self._snapshot().patches
        return patches[resolve_ref(patches, ref)]

    def list_patches(self) -> list[PatchRecord]:
        return sorted(self._snapshot().patches.values(), key=lambda r: (r.name, r.version))

    def get_patch_bytes(self, ref: str) -> bytes:
        pid = self.resolve(ref)
        return self.blobs.read(pid, registered=pid in self._snapshot().patches)

    def load_patch(self, ref: str) -> Patch:
        pid = self.resolve(ref)
        return self.blobs.load(pid, self.get_patch_bytes(pid))

    def get_tenant(self, tenant: str) -> TenantRecord:
        tenants = self._snapshot().tenants
        if tenant not in tenants:
            raise TenantNotFound(unknown_tenant(tenant, tenants))
        return tenants[tenant]

    def list_tenants(self) -> list[TenantRecord]:
        tenants = self._snapshot().tenants
        return [tenants[name] for name in sorted(tenants)]

    def import_copy(self, state: RegistryState, patch_bytes: Callable[[str], bytes]) -> None:
        require_copyable(state)
        with self._writing() as current:
            if current.generation != 0 or current.patches or current.tenants:
                raise RegistryExists(
                    f"this registry is not new and empty (generation {current.generation}): "
                    "a copy goes into a new registry only"
                )
            if state.generation == 0:
                return
            for pid in state.patches:
                file = io.BytesIO(patch_bytes(pid))
                checked, _ = check_file(file, self.limits)
                if checked.sha256 != pid:
                    raise RegistryCorrupt(f"the copy's file for patch {pid[:12]} is not it")
                self.blobs.store(file, checked)  # every file before the state naming it
            self._save(state)

    # --- writing ------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the writers' lock; leftover temp files can only be a crashed writer's."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise self._missing_state() from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for entry in os.scandir(self._tmp):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def _writing(self) -> Iterator[RegistryState]:
        """Hold the writers' lock and yield the state as it is on disk now (which must exist:
        a write never starts a registry)."""
        with self._locked():
            yield self._read_state()

    def _save(self, state: RegistryState) -> None:
        # The marker's generation first: it must never be below a generation on disk.
        marker = read_marker(self._marker_path)
        if marker is None or marker.generation < state.generation:
            created = marker.created_at if marker else now_iso()
            write_marker(self._marker_path, RegistryMarker(created, state.generation), self._tmp)
        atomic_write_bytes(self._state_path, state.to_json(), tmp_dir=self._tmp)

    def put_patch_file(
        self,
        file: BinaryIO,
        name: str | None = None,
        check: Callable[[Patch], None] | None = None,
    ) -> Registration:
        checked, patch = check_file(file, self.limits)
        if check is not None:
            check(patch)
        named = name is not None
        name = check_patch_name(name) if named else default_patch_name(patch)
        pid, manifest = checked.sha256, checked.manifest
        with self._writing() as state:
            existing = state.patches.get(pid)
            if existing is not None:
                if named and name != existing.name:
                    raise PatchExists(
                        f"this file is registered already as {existing.ref} (id "
                        f"{pid[:12]}); a patch has one name: use {existing.ref!r}, or delete "
                        f"it before registering it as {name!r}"
                    )
                return Registration(existing, created=False)
            version = state.next_version(name)
            record = PatchRecord(
                id=pid,
                name=name,
                version=version,
                size=checked.size,
                kind=manifest.kind,
                method=manifest.method,
                concepts=list(manifest.concepts),
                target=manifest.target.component,
                created_at=manifest.created_at.isoformat(),
                registered_at=now_iso(),
            )
            # Blob first: a state.json must never name a file that is not complete on disk.
            self.blobs.store(file, checked)
            versions = {**state.versions, name: version}
            self._save(state.next(patches={**state.patches, pid: record}, versions=versions))
        return Registration(record, created=True)

    def delete_patch(self, ref: str) -> PatchRecord:
        with self._writing() as state:
            pid = resolve_ref(state.patches, ref)
            record = state.patches[pid]
            users = sorted(t.tenant for t in state.tenants.values() if pid in t.stack)
            if users:
                raise PatchInUse(
                    f"patch {record.ref} ({pid[:12]}) is in the current stack of tenant(s) "
                    f"{', '.join(users)}; give them another stack first"
                )
            patches = {k: v for k, v in state.patches.items() if k != pid}
            self._save(state.next(patches=patches))
            # Still under the lock, so a concurrent put of the same bytes cannot lose its file.
            self.blobs.path(pid).unlink(missing_ok=True)
        return record

    def set_tenant(self, tenant: str, refs: Sequence[str], create: bool = True) -> TenantRecord:
        check_tenant_name(tenant)
        if isinstance(refs, str):
            raise TypeError("refs must be a sequence of patch references, not one string")
        refs = list(refs)
        with self._writing() as state:
            if not create and tenant not in state.tenants:
                raise TenantNotFound(
                    f"{unknown_tenant(tenant, state.tenants)}; creating a tenant must be asked "
                    "for (--create)"
                )
            ids = tuple(resolve_ref(state.patches, ref) for ref in refs)
            check_stack(tenant, ids, refs)
            old = state.tenants.get(tenant)
            record = append_history(old, tenant, ids, state.generation + 1, "assign")
            self._save(state.next(tenants={**state.tenants, tenant: record}))
        return record

    def rollback_tenant(self, tenant: str, to_generation: int | None = None) -> TenantRecord:
        with self._writing() as state:
            if tenant not in state.tenants:
                raise TenantNotFound(unknown_tenant(tenant, state.tenants))
            old = state.tenants[tenant]
            stack = rollback_target(old, to_generation)
            missing = [pid[:12] for pid in stack if pid not in state.patches]
            if missing:
                raise PatchNotFound(
                    f"cannot roll tenant {tenant!r} back: that stack uses deleted patch(es) "
                    f"{', '.join(missing)}; register them again first"
                )
            record = append_history(old, tenant, stack, state.generation + 1, "rollback")
            self._save(state.next(tenants={**state.tenants, tenant: record}))
        return record

    def delete_tenant(self, tenant: str) -> None:
        with self._writing() as state:
            if tenant not in state.tenants:
                raise TenantNotFound(unknown_tenant(tenant, state.tenants))
            tenants = {k: v for k, v in state.tenants.items() if k != tenant}
            self._save(state.next(tenants=tenants))

    # --- checking -----------------------------------------------------------------------

    def check(self) -> list[str]:
        try:
            state = self._read_state()
        except (RegistryCorrupt, RegistryUnreadable) as exc:
            return [str(exc)]
        problems = []
        for record in state.patches.values():
            problems += self.blobs.problems(record)
        return problems + state_problems(state)
