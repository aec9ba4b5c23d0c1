"""The per-worker patch runtime: which stack each tenant is served with, kept in step with the
registry.

Before every batch the worker calls `refresh()`. It reads the registry's snapshot (one
`stat` when nothing changed); on a new generation it rebuilds only the tenants whose record
changed (`TenantRecord.generation` or stack), plus any that failed before. Each rebuild is
stage - validate - commit: load every patch (re-validated, checked against its id), refuse
kinds this server cannot serve, verify each against the served model, compose the stack,
build the tenant's text plan, all off to the side; then one new immutable snapshot replaces
the old one. A batch takes the snapshot once at its start, so its rows finish with the stacks
they started with however the registry moves meanwhile.

Fail closed: a tenant whose stack cannot be loaded or verified is kept as a failed state with
its reason, and its requests get 503 - never the unpatched model. An unreadable registry fails
every tenant, because no tenant's stack can be known.

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
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from patches.errors import ConceptGuardError
from patches.registry import Registry, TenantRecord
from patches.stacks import compose_weight_stack
from server.denoiser_routing import DenoiserRouter
from server.denoiser_stacks import DENOISER_KINDS, DenoiserStack
from server.errors import RegistryUnavailable, StackNotReady, UnsupportedPatchKind
from server.text_encoding import TextPlan, build_text_plan

logger = logging.getLogger(__name__)

SERVABLE_KINDS = ("text_encoder", *DENOISER_KINDS)


def check_servable_kind(kind: str, label: str) -> None:
    """Refuse patch kinds this server cannot serve yet (422), naming the patch."""
    if kind not in SERVABLE_KINDS:
        raise UnsupportedPatchKind(
            f"{label} is a {kind} patch; this server serves {', '.join(SERVABLE_KINDS)} "
            "patches only"
        )


@dataclass(frozen=True)
class _Plan:
    """What a stack is served with: its text plan and its prepared denoiser stack."""

    text: TextPlan | None
    denoiser: DenoiserStack | None


@dataclass(frozen=True)
class TenantState:
    """How one tenant is served: its stack and plan, or why it cannot be (fail closed)."""

    tenant: str
    stack: tuple[str, ...] = ()
    tenant_generation: int = 0
    plan: TextPlan | None = None  # None with no failure: no text patch, the base encoder
    denoiser: DenoiserStack | None = None  # None with no failure: the base denoiser
    failure: str | None = None

    def require_ready(self) -> TenantState:
        """This state if the tenant can be served, else StackNotReady with the reason."""
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
    ):
        self.registry = registry
        self.pipe = pipe
        self.events = events or NoEvents()
        self.cache_size = cache_size
        self.denoiser = denoiser or DenoiserRouter(pipe)
        self._plans: OrderedDict[tuple[str, ...], _Plan] = OrderedDict()
        self._snapshot = RuntimeSnapshot(generation=-1)

    @property
    def snapshot(self) -> RuntimeSnapshot:
        return self._snapshot

    def refresh(self) -> RuntimeSnapshot:
        """Catch up with the registry; returns the snapshot a batch should use."""
        current = self._snapshot
        try:
            state = self.registry.snapshot()
        except (ConceptGuardError, OSError) as exc:
            logger.error("cannot read the registry; failing every tenant closed: %s", exc)
            self._snapshot = RuntimeSnapshot(current.generation, {}, registry_error=str(exc))
            return self._snapshot
        if state.generation == current.generation and current.registry_error is None:
            return current
        tenants = {}
        for name, record in state.tenants.items():
            old = current.tenants.get(name)
            unchanged = (
                old is not None
                and old.failure is None
                and old.tenant_generation == record.generation
                and old.stack == record.stack
            )
            tenants[name] = old if unchanged else self._build(record, reload=old is not None)
        self._snapshot = RuntimeSnapshot(state.generation, MappingProxyType(tenants))
        self._prune_cache()
        self.events.generation_seen(state.generation)
        return self._snapshot

    def _build(self, record: TenantRecord, reload: bool) -> TenantState:
        started = time.perf_counter()
        try:
            plan = self._plan_for(record.stack) or _Plan(None, None)
        except Exception as exc:
            # Whatever goes wrong (a refusal, I/O, torch out of memory), it fails this tenant
            # only: the worker and every other tenant keep serving.
            reason = f"{type(exc).__name__}: {exc}"
            expected = isinstance(exc, (ConceptGuardError, OSError))
            logger.error("tenant %r fails closed: %s", record.tenant, reason, exc_info=not expected)
            self.events.stack_failed(record.tenant, exc)
            return TenantState(record.tenant, record.stack, record.generation, failure=reason)
        self.events.stack_built(record.tenant, reload, time.perf_counter() - started)
        return TenantState(record.tenant, record.stack, record.generation, plan.text, plan.denoiser)

    def _plan_for(self, stack: tuple[str, ...]) -> _Plan | None:
        if not stack:
            return None
        if stack in self._plans:
            self._plans.move_to_end(stack)
            return self._plans[stack]
        text, denoiser = [], []
        for pid in stack:
            patch = self.registry.load_patch(pid)
            check_servable_kind(patch.manifest.kind, f"patch {pid[:12]}")
            patch.verify(self.pipe)
            (denoiser if patch.manifest.kind in DENOISER_KINDS else text).append(patch)
        text_plan = (
            build_text_plan(self.pipe, compose_weight_stack(self.pipe, text)) if text else None
        )
        # Last: a failure above leaves the denoiser's slots as they were.
        plan = _Plan(text_plan, self.denoiser.prepare(denoiser))
        self._plans[stack] = plan
        return plan

    def _prune_cache(self) -> None:
        """Keep the plans in use plus the `cache_size` most recently used others; release
        the denoiser slots of stacks no kept plan holds."""
        in_use = {s.stack for s in self._snapshot.tenants.values()}
        spare = [stack for stack in self._plans if stack not in in_use]
        for stack in spare[: max(0, len(spare) - self.cache_size)]:
            del self._plans[stack]
        kept = {p.denoiser.patch_ids for p in self._plans.values() if p.denoiser is not None}
        self.denoiser.release_unused(kept)
