"""The per-worker patch runtime: which stack each tenant is served with, kept in step with the
registry.

Before every batch (and while idle) the worker calls `refresh()`. It asks the registry for
the changes since the generation it holds (`Registry.changes_since`: one `stat` or one
query when nothing changed) and returns at once: only the tenants the changes name (and
those still waiting for a build or a retry) are looked at again, so a refresh costs what
changed, not the number of tenants; the others keep their state. A tenant whose stack
changed is *pending* until its new stack is
built, and its requests wait for it - they are never served by the stack it had before. A
batch that holds such rows gives the build a short grace (`await_builds`, bounded by the
server's `build_grace_s`, once per build): a quick build joins the batch; a slower one
leaves its rows held back by the worker loop for a later batch. Builds are
stage - validate - commit, and the slow part runs on a build thread, off the batch path:
load every patch (re-validated, checked against its id), refuse kinds this server cannot
serve, verify each against the model's signature taken at start-up, compose the stack over
the base parameters taken at start-up, prepare the denoiser patches (exact factors,
modules). The commit - cloning the few edited text-encoder stages, writing the denoiser
slots - is quick and happens in `refresh`, on the thread that runs batches, so nothing a
batch reads changes under it. Then one new immutable snapshot replaces the old one. A batch
takes the snapshot once at its start, so its rows finish with the stacks they started
with however the registry moves meanwhile. During a batch, between denoising steps, the
worker calls `prefetch()`: it reads the change feed and starts the builds it calls for,
committing nothing, and the next `refresh` takes those changes - so a stack changed
mid-batch is usually built by the next batch, whose rows of that tenant are then served
instead of held back for one more batch.

Fail closed: a tenant whose stack cannot be loaded or verified is kept as a failed state with
its reason, and its requests get 503 - never the unpatched model. Failed stacks are built
again on the next registry change, and otherwise after a backoff (1 s, doubling to 60 s),
so a transient failure (a file not yet visible on a shared volume) heals by itself. An
unreadable registry fails every tenant, because no tenant's stack can be known.

A stack's denoiser patches (LoRA, dense weight edits, added modules) become one prepared
denoiser stack with a slot in the worker's per-row denoiser (server/denoiser_routing.py);
its text-encoder patches become the tenant's text plan. A stack may hold both, in any order
(each kind's patches keep their relative order).

Built plans are cached by stack (a tuple of content-addressed patch ids), so a rollback or a
tenant sharing another's stack costs nothing, and re-registering a name with new bytes can
never hit a stale entry.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from patches.errors import ConceptGuardError
from patches.patch import Patch
from patches.registry import Registry, TenantRecord
from patches.registry_state import RegistryChanges
from patches.signature import ModelSignature
from patches.stacks import ComposedWeights, base_parameters, compose_weight_stack
from patches.targets import denoiser_component, pipeline_components
from server.denoiser_routing import DenoiserRouter
from server.denoiser_stacks import DENOISER_KINDS, DenoiserStack
from server.errors import RegistryUnavailable, StackNotReady, UnsupportedPatchKind
from server.text_encoding import TextPlan, build_text_plan

logger = logging.getLogger(__name__)

SERVABLE_KINDS = ("text_encoder", *DENOISER_KINDS)
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
LOADED_CACHE_BYTES = 256 << 20  # patches kept loaded between builds (their tensors' bytes)


def check_servable_kind(kind: str, label: str) -> None:
    """Refuse patch kinds this server cannot serve (422), naming the patch."""
    if kind not in SERVABLE_KINDS:
        raise UnsupportedPatchKind(
            f"{label} is a {kind} patch; this server serves {', '.join(SERVABLE_KINDS)} "
            "patches only"
        )


def check_servable(patch: Patch, model: Any, label: str) -> None:
    """`patch` fits `model` (a pipeline or its ModelSignature) and this server can serve
    it (422 otherwise): dense denoiser edits must be weights of Linear/Conv2d layers, the
    only ones the per-row denoiser adapts. (A dense edit's rank is known only against the
    base weights: a worker checks it when it builds the stack.)"""
    kind = patch.manifest.kind
    check_servable_kind(kind, label)
    patch.verify(model)
    if kind != "unet_weights":
        return
    from patches.signature import signature_of

    layers = signature_of(model, patch.manifest.target.component).layers
    for name in patch.edit_shapes():
        path, _, leaf = name.rpartition(".")
        if leaf != "weight" or path not in layers:
            raise UnsupportedPatchKind(
                f"{label} edits '{name}' densely; this server serves dense denoiser edits of "
                "Linear and Conv2d weights only (as exact low-rank adapters, per row)"
            )


class StackBuilding(StackNotReady):
    """The tenant's new stack is still being built: its requests wait for it (the worker
    loop holds them back); 503 only if one ever had to be answered meanwhile."""


@dataclass(frozen=True)
class _Plan:
    """What a stack is served with: its text plan and its prepared denoiser stack."""

    text: TextPlan | None
    denoiser: DenoiserStack | None


@dataclass(frozen=True)
class _Built:
    """A stack's slow part, done on the build thread; `_commit` makes it a `_Plan`."""

    text: dict[str, ComposedWeights]
    denoiser: DenoiserStack | None
    seconds: float


@dataclass(frozen=True)
class _Failure:
    reason: str
    error: Exception
    retry_at: float  # time.monotonic()


@dataclass(frozen=True)
class TenantState:
    """How one tenant is served: its stack and plan, or why it cannot be (yet)."""

    tenant: str
    stack: tuple[str, ...] = ()
    tenant_generation: int = 0
    plan: TextPlan | None = None  # None when ready: no text patch, the base encoder
    denoiser: DenoiserStack | None = None  # None when ready: the base denoiser
    failure: str | None = None  # fail closed, with the reason
    pending: bool = False  # its stack is being built

    @property
    def ready(self) -> bool:
        return self.failure is None and not self.pending

    def require_ready(self) -> TenantState:
        """This state if the tenant can be served, else StackNotReady with the reason
        (StackBuilding while its stack is being built)."""
        if self.pending:
            raise StackBuilding(
                f"tenant {self.tenant!r}: its patch stack (registry generation "
                f"{self.tenant_generation}) is still being built"
            )
        if self.failure is not None:
            raise StackNotReady(
                f"tenant {self.tenant!r} is not served: its patch stack (registry generation "
                f"{self.tenant_generation}) could not be loaded: {self.failure}"
            )
        return self


@dataclass(frozen=True)
class RuntimeSnapshot:
    """An immutable view of every tenant's state at one registry generation."""

    generation: int
    tenants: Mapping[str, TenantState] = field(default_factory=dict)
    registry_error: str | None = None

    def state_for(self, tenant: str) -> TenantState:
        if self.registry_error is not None:
            raise RegistryUnavailable(f"the patch registry cannot be read: {self.registry_error}")
        # A tenant with no registry record has an empty stack: the base model, by choice.
        return self.tenants.get(tenant) or TenantState(tenant)

    @property
    def settled(self) -> bool:
        """No tenant waits for a build or a retry."""
        return all(s.ready for s in self.tenants.values())


class RuntimeEvents(Protocol):
    """What the runtime reports (metrics); every method must be cheap and never raise."""

    def stack_built(self, tenant: str, reload: bool, seconds: float) -> None: ...
    def stack_failed(self, tenant: str, error: ConceptGuardError | Exception) -> None: ...
    def generation_seen(self, generation: int) -> None: ...


class NoEvents:
    def stack_built(self, tenant: str, reload: bool, seconds: float) -> None:
        pass

    def stack_failed(self, tenant: str, error: ConceptGuardError | Exception) -> None:
        pass

    def generation_seen(self, generation: int) -> None:
        pass


class PatchRuntime:
    """Per-worker tenant states for `pipe` (whose components stay unpatched)."""

    def __init__(
        self,
        registry: Registry,
        pipe: Any,
        events: RuntimeEvents | None = None,
        cache_size: int = 32,
        denoiser: DenoiserRouter | None = None,
        retry_s: tuple[float, float] = (RETRY_FIRST_S, RETRY_MAX_S),
    ):
        self.registry = registry
        self.retry_s = retry_s  # backoff of failed stacks: first delay, longest delay
        self.pipe = pipe
        self.events = events or NoEvents()
        self.cache_size = cache_size
        self.denoiser = denoiser or DenoiserRouter(pipe)
        # What builds read instead of the live pipeline, whose text encoders are rerouted
        # during every batch: the signature to verify against, the base parameters.
        self.signature = ModelSignature.of(pipe)
        self.base = {name: base_parameters(pipe, name) for name in pipeline_components(pipe)}
        self._denoiser_name = denoiser_component(pipe)
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="stack-build")
        self._builds: dict[tuple[str, ...], Future[_Built]] = {}
        self._failures: dict[tuple[str, ...], _Failure] = {}
        self._attempts: dict[tuple[str, ...], int] = {}  # failed builds in a row, per stack
        self._served: set[str] = set()  # tenants that had a state: a new stack is a reload
        self._loaded: OrderedDict[str, Patch] = OrderedDict()  # the build thread's only
        self.loaded_cache_bytes = LOADED_CACHE_BYTES
        self._plans: OrderedDict[tuple[str, ...], _Plan] = OrderedDict()
        self._snapshot = RuntimeSnapshot(generation=-1)
        # The registry's tenant records as of the snapshot, and the tenants whose state
        # waits for a build or a retry: what a refresh looks at besides the changes.
        self._records: dict[str, TenantRecord] = {}
        self._unsettled: set[str] = set()
        self._in_use: Counter[tuple[str, ...]] = Counter()  # tenants per stack in the snapshot
        # Changes read by `prefetch` during a batch, not yet in a snapshot: the next refresh
        # takes them (the feed cannot be read twice from one generation without a full read).
        self._prefetched: RegistryChanges | None = None

    @property
    def snapshot(self) -> RuntimeSnapshot:
        return self._snapshot

    @property
    def building(self) -> bool:
        """Whether stack builds are in flight (or finished and not yet committed)."""
        return bool(self._builds)

    @property
    def stacks_in_build(self) -> set[tuple[str, ...]]:
        """The stacks whose builds are in flight (or finished and not yet committed)."""
        return set(self._builds)

    @property
    def build_finished(self) -> bool:
        """Whether a build waits to be committed by the next `refresh`."""
        return any(future.done() for future in self._builds.values())

    @property
    def changes_waiting(self) -> bool:
        """Whether `prefetch` read changes that no snapshot holds yet."""
        return self._prefetched is not None

    def prefetch(self) -> None:
        """During a batch (between denoising steps): read the registry's changes and start
        the builds they call for, so a tenant whose stack changed mid-batch is served by the
        next batch, not held back for one more. Commits nothing - the batch in flight keeps
        its snapshot and the denoiser's slots stay as they are; the next `refresh` takes the
        changes read here. A registry that cannot be read is left to that refresh."""
        current = self._snapshot
        if current.registry_error or current.generation < 0:
            return  # the next refresh reads everything anyway
        held = self._prefetched
        try:
            changes = self.registry.changes_since(
                current.generation if held is None else held.generation
            )
        except (ConceptGuardError, OSError):
            return
        if changes.empty:
            return
        self._prefetched = changes if held is None else held.then(changes)
        for record in changes.tenants.values():
            if record.stack and record.stack not in self._plans:
                self._start_build(record.stack)

    def await_builds(self, stacks: Iterable[tuple[str, ...]], timeout: float) -> bool:
        """Wait up to `timeout` s for the builds of `stacks` in flight; whether any of them
        finished (the next `refresh` commits it). Never longer: the caller's other rows
        wait meanwhile."""
        futures = [self._builds[s] for s in set(stacks) if s in self._builds]
        if not futures or timeout <= 0:
            return False
        finished, _ = wait(futures, timeout=timeout)
        return bool(finished)

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)

    def refresh(self, wait: bool = False) -> RuntimeSnapshot:
        """Catch up with the registry; returns the snapshot a batch should use. Builds of
        changed stacks run on the build thread; `wait` waits for them (start-up, tests)."""
        current = self._snapshot
        # After a failure the tenants are gone from the snapshot: read everything again.
        since = None if current.registry_error or current.generation < 0 else current.generation
        held, self._prefetched = self._prefetched, None
        try:
            if held is not None and since is not None:
                changes = held.then(self.registry.changes_since(held.generation))
            else:
                changes = self.registry.changes_since(since)
        except (ConceptGuardError, OSError) as exc:
            if str(exc) != current.registry_error:  # logged when it changes, not every pass
                logger.error("cannot read the registry; failing every tenant closed: %s", exc)
            self._snapshot = RuntimeSnapshot(current.generation, {}, registry_error=str(exc))
            return self._snapshot
        new_generation = changes.generation != current.generation or current.registry_error
        if new_generation:
            # Any registry change retries every failed stack at once.
            self._failures.clear()
            self._attempts.clear()
        if wait:
            for future in list(self._builds.values()):
                future.exception()  # waits; a failure is recorded when it is committed
        finished, fresh = self._commit_finished()
        if not (new_generation or finished or self._retry_due()):
            return current
        tenants = self._tenant_states(changes, current, fresh)
        self._snapshot = RuntimeSnapshot(changes.generation, MappingProxyType(tenants))
        self._prune_cache()
        if new_generation:
            self.events.generation_seen(changes.generation)
        if wait and not self._snapshot.settled and self._builds:
            return self.refresh(wait=True)
        return self._snapshot

    def _tenant_states(
        self,
        changes: RegistryChanges,
        current: RuntimeSnapshot,
        fresh: Mapping[tuple[str, ...], float],
    ) -> dict[str, TenantState]:
        """Every tenant's state after `changes`: the tenants they name (all of them when they
        are everything) and the unsettled ones are looked at again; the rest keep theirs."""
        if changes.full:
            self._records = dict(changes.tenants)
            tenants, names = {}, set(self._records)
            self._in_use.clear()
        else:
            tenants = dict(current.tenants)
            for name in changes.removed_tenants:
                self._records.pop(name, None)
                gone = tenants.pop(name, None)
                if gone is not None:
                    self._in_use[gone.stack] -= 1
            self._records.update(changes.tenants)
            names = {n for n in self._unsettled | set(changes.tenants) if n in self._records}
        for name in names:
            old = tenants.get(name)
            if old is not None:
                self._in_use[old.stack] -= 1
            tenants[name] = self._state(self._records[name], current.tenants.get(name), fresh)
            self._in_use[tenants[name].stack] += 1
        self._unsettled = {name for name in names if not tenants[name].ready}
        return tenants

    def _state(
        self, record: TenantRecord, old: TenantState | None, fresh: Mapping[tuple[str, ...], float]
    ) -> TenantState:
        stack = record.stack
        ready = TenantState(record.tenant, stack, record.generation)
        if (
            old is not None
            and old.ready
            and (old.stack, old.tenant_generation)
            == (
                stack,
                record.generation,
            )
        ):
            return old
        reload = record.tenant in self._served
        if not stack:
            self._served.add(record.tenant)
            return ready
        if stack in self._plans:
            self._plans.move_to_end(stack)
            plan = self._plans[stack]
            # Built now, or taken from the cache (a rollback, another tenant's stack): 0 s.
            self.events.stack_built(record.tenant, reload, fresh.get(stack, 0.0))
            self._served.add(record.tenant)
            return replace(ready, plan=plan.text, denoiser=plan.denoiser)
        failure = self._failures.get(stack)
        if failure is not None:
            if old is None or old.failure != failure.reason:
                logger.error("tenant %r fails closed: %s", record.tenant, failure.reason)
                self.events.stack_failed(record.tenant, failure.error)
            self._served.add(record.tenant)
            return replace(ready, failure=failure.reason)
        self._start_build(stack)
        return replace(ready, pending=True)

    def _start_build(self, stack: tuple[str, ...]) -> None:
        """Build `stack` on the build thread, unless a build of it is in flight already."""
        if stack not in self._builds:
            self._builds[stack] = self._builder.submit(self._build, stack)

    def _build(self, stack: tuple[str, ...]) -> _Built:
        """The slow part of a stack, on the build thread: reads the registry, the start-up
        signature and base parameters, and the denoiser's modules; changes nothing shared."""
        started = time.perf_counter()
        text: list[Patch] = []
        denoiser: list[Patch] = []
        for pid in stack:
            patch = self._load(pid)
            check_servable(patch, self.signature, f"patch {pid[:12]}")
            (denoiser if patch.manifest.kind in DENOISER_KINDS else text).append(patch)
        composed = compose_weight_stack(self.pipe, text, self.base) if text else {}
        prepared = self.denoiser.build(denoiser, self.base.get(self._denoiser_name))
        return _Built(composed, prepared, time.perf_counter() - started)

    def _load(self, pid: str) -> Patch:
        """A patch by id, re-validated from the registry, or from the build thread's cache
        of recently loaded ones (ids are content hashes: a hit is the same bytes). Stacks
        share patches - 64-patch stacks of 20 tenants are mostly the same files."""
        patch = self._loaded.pop(pid, None)
        if patch is None:
            patch = self.registry.load_patch(pid)
        self._loaded[pid] = patch  # most recent last
        total = sum(p.nbytes for p in self._loaded.values())
        while total > self.loaded_cache_bytes and len(self._loaded) > 1:
            total -= self._loaded.pop(next(iter(self._loaded))).nbytes
        return patch

    def _commit_finished(self) -> tuple[bool, dict[tuple[str, ...], float]]:
        """Turn finished builds into cached plans (or recorded failures): whether any build
        finished, and the stacks that became plans, with their build seconds."""
        done = [stack for stack, future in self._builds.items() if future.done()]
        fresh = {}
        for stack in done:
            future = self._builds.pop(stack)
            try:
                built = future.result()
                text = build_text_plan(self.pipe, built.text) if built.text else None
                # Last: a failure above leaves the denoiser's slots as they were.
                denoiser = self.denoiser.add(built.denoiser) if built.denoiser else None
            except Exception as exc:
                # Whatever goes wrong (a refusal, I/O, out of memory), it fails the tenants
                # of this stack only: the worker and every other tenant keep serving.
                self._record_failure(stack, exc)
                continue
            self._plans[stack] = _Plan(text, denoiser)
            self._attempts.pop(stack, None)
            fresh[stack] = built.seconds
        return bool(done), fresh

    def _record_failure(self, stack: tuple[str, ...], exc: Exception) -> None:
        expected = isinstance(exc, (ConceptGuardError, OSError))
        reason = f"{type(exc).__name__}: {exc}"
        stack_ids = [pid[:12] for pid in stack]
        logger.error("stack %s fails closed: %s", stack_ids, reason, exc_info=not expected)
        attempts = self._attempts.get(stack, 0) + 1
        self._attempts[stack] = attempts
        first, longest = self.retry_s
        delay = min(longest, first * 2 ** (attempts - 1))
        self._failures[stack] = _Failure(reason, exc, time.monotonic() + delay)

    def _retry_due(self) -> bool:
        """Drop failures whose backoff has run out, so their stacks are built again."""
        now = time.monotonic()
        due = [stack for stack, f in self._failures.items() if f.retry_at <= now]
        for stack in due:
            del self._failures[stack]
            self._start_build(stack)
        return bool(due)

    def _prune_cache(self) -> None:
        """Keep the plans in use plus the `cache_size` most recently used others; release
        the denoiser slots of stacks no kept plan holds."""
        # Counted as tenants change (`_in_use`), so a refresh costs what changed, not the
        # number of tenants (a set over 10,000 tenants was most of a refresh's 5 ms).
        self._in_use = +self._in_use  # stacks no tenant holds any more drop out
        in_use = set(self._in_use)
        spare = [stack for stack in self._plans if stack not in in_use]
        for stack in spare[: max(0, len(spare) - self.cache_size)]:
            del self._plans[stack]
        kept = {p.denoiser.patch_ids for p in self._plans.values() if p.denoiser is not None}
        self.denoiser.release_unused(kept)
