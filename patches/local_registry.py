"""`LocalRegistry`: the registry kept in one local (or shared-volume) directory.

Layout:

    DIR/state.json                the single source of truth, replaced atomically:
                                  {"format": 1, "generation": N,
                                   "patches": {id: record}, "tenants": {name: record}}
    DIR/blobs/<id>.safetensors    immutable, content-addressed patch files (id = sha256)
    DIR/tmp/                      temp files for atomic writes (same filesystem)
    DIR/lock                      the writers' lock file

Writers take an exclusive `flock` on DIR/lock, re-read state.json under it, write any new
blob (temp file, fsync, rename, fsync dir) BEFORE the state.json that refers to it, then
replace state.json the same way. A crash at any point leaves the old state or the new one;
a blob no record names is an invisible, harmless orphan that the next put of the same bytes
rewrites. Leftover temp files can only come from a crashed writer, so each writer clears
DIR/tmp once it holds the lock. Deleting a patch drops its record first, then its blob.

Readers never lock: rename makes every state.json they open a whole one. They cache the
parsed state keyed by the file's (inode, mtime, size), so `generation()` costs one `stat`;
for a second after each write (see RACY_NS) they re-read the bytes, parsing only on change.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from patches.atomic import atomic_write_bytes
from patches.errors import (
    PatchFileError,
    PatchInUse,
    PatchNotFound,
    RegistryCorrupt,
    RegistryError,
    TenantNotFound,
)
from patches.registry import Registry
from patches.registry_records import (
    PatchRecord,
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
from patches.registry_state import RegistryState, state_problems, unknown_tenant

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


def _validate(data: bytes, limits: FileLimits | None) -> Patch:
    # Imported here: torch takes about a second to import and only validation needs it.
    from patches.patch import Patch
    from patches.patch_file import DEFAULT_LIMITS

    return Patch.from_bytes(data, limits or DEFAULT_LIMITS)


class LocalRegistry(Registry):
    """A registry in directory `root` (created if missing); safe for many processes."""

    def __init__(self, root: str | os.PathLike, limits: FileLimits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits
        self._state_path = self.root / "state.json"
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._lock_path = self.root / "lock"
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry location {self.root} exists and is not a directory")
        for directory in (self.root, self._blobs, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        # Replaced whole, never changed, so reader threads always see a coherent entry.
        self._cache: _Cached | None = None

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    # --- reading ------------------------------------------------------------------------

    def _read_state(self, trust_stat: bool = False) -> RegistryState:
        """The state on disk. With `trust_stat`, an unchanged stat key skips the read; in any
        case unchanged bytes skip the parse."""
        try:
            st = os.stat(self._state_path)
        except FileNotFoundError:
            return RegistryState()
        key, cached = (st.st_ino, st.st_mtime_ns, st.st_size), self._cache
        if trust_stat and cached is not None and cached.trusted and cached.key == key:
            return cached.state
        read_at = time.time_ns()
        try:
            with open(self._state_path, "rb") as handle:
                st = os.fstat(handle.fileno())
                text = handle.read()
        except FileNotFoundError:
            return RegistryState()
        if cached is not None and cached.text == text:
            state = cached.state
        else:
            try:
                state = RegistryState.from_json(text)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise RegistryCorrupt(
                    f"{self._state_path} is not a valid registry state: {exc}"
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

    def resolve(self, ref: str) -> str:
        return resolve_ref(self._snapshot().patches, ref)

    def patch_record(self, ref: str) -> PatchRecord:
        patches = self._snapshot().patches
        return patches[resolve_ref(patches, ref)]

    def list_patches(self) -> list[PatchRecord]:
        return sorted(self._snapshot().patches.values(), key=lambda r: (r.name, r.version))

    def _blob_path(self, pid: str) -> Path:
        return self._blobs / f"{pid}.safetensors"

    def get_patch_bytes(self, ref: str) -> bytes:
        pid = self.resolve(ref)
        try:
            return self._blob_path(pid).read_bytes()
        except FileNotFoundError:
            if pid in self._snapshot().patches:
                raise RegistryCorrupt(
                    f"patch {pid} is registered but its file {self._blob_path(pid)} is missing"
                ) from None
            raise PatchNotFound(f"patch {ref!r} was deleted while it was being read") from None

    def load_patch(self, ref: str) -> Patch:
        pid = self.resolve(ref)
        data = self.get_patch_bytes(pid)
        actual = hashlib.sha256(data).hexdigest()
        if actual != pid:
            raise RegistryCorrupt(
                f"stored patch file {self._blob_path(pid)} hashes to {actual[:16]}..., "
                f"not its id {pid[:16]}...: the file was changed or damaged on disk"
            )
        try:
            return _validate(data, self.limits)
        except PatchFileError as exc:
            raise RegistryCorrupt(
                f"stored patch {pid[:16]}... no longer passes validation: {exc}"
            ) from exc

    def get_tenant(self, tenant: str) -> TenantRecord:
        tenants = self._snapshot().tenants
        if tenant not in tenants:
            raise TenantNotFound(unknown_tenant(tenant, tenants))
        return tenants[tenant]

    def list_tenants(self) -> list[TenantRecord]:
        tenants = self._snapshot().tenants
        return [tenants[name] for name in sorted(tenants)]

    # --- writing ------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[RegistryState]:
        """Hold the writer lock and yield the state as it is on disk now."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for entry in os.scandir(self._tmp):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
            yield self._read_state()
        finally:
            os.close(fd)  # releases the lock

    def _save(self, state: RegistryState) -> None:
        atomic_write_bytes(self._state_path, state.to_json(), tmp_dir=self._tmp)

    def put_patch(
        self,
        data: bytes,
        name: str | None = None,
        check: Callable[[Patch], None] | None = None,
    ) -> PatchRecord:
        patch = _validate(data, self.limits)
        if check is not None:
            check(patch)
        name = check_patch_name(name) if name is not None else default_patch_name(patch)
        pid = hashlib.sha256(data).hexdigest()
        manifest = patch.manifest
        with self._writing() as state:
            if pid in state.patches:
                return state.patches[pid]
            version = state.next_version(name)
            record = PatchRecord(
                id=pid,
                name=name,
                version=version,
                size=len(data),
                kind=manifest.kind,
                method=manifest.method,
                concepts=list(manifest.concepts),
                target=manifest.target.component,
                created_at=manifest.created_at.isoformat(),
                registered_at=now_iso(),
            )
            # Blob first: a state.json must never name a file that is not complete on disk.
            atomic_write_bytes(self._blob_path(pid), bytes(data), tmp_dir=self._tmp)
            versions = {**state.versions, name: version}
            self._save(state.next(patches={**state.patches, pid: record}, versions=versions))
        return record

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
            self._blob_path(pid).unlink(missing_ok=True)
        return record

    def set_tenant(self, tenant: str, refs: Sequence[str]) -> TenantRecord:
        check_tenant_name(tenant)
        if isinstance(refs, str):
            raise TypeError("refs must be a sequence of patch references, not one string")
        refs = list(refs)
        with self._writing() as state:
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
        except RegistryCorrupt as exc:
            return [str(exc)]
        problems = []
        for record in state.patches.values():
            problems += self._check_blob(record)
        return problems + state_problems(state)

    def _check_blob(self, record: PatchRecord) -> list[str]:
        path = self._blob_path(record.id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return [f"patch {record.ref} ({record.id[:12]}): file {path} is missing"]
        if hashlib.sha256(data).hexdigest() != record.id or len(data) != record.size:
            return [f"patch {record.ref} ({record.id[:12]}): {path} does not match its id"]
        try:
            _validate(data, self.limits)
        except PatchFileError as exc:
            return [f"patch {record.ref} ({record.id[:12]}): fails validation: {exc}"]
        return []
