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

U-Net LoRA patches in a stack are loaded into the worker's one U-Net as named adapters
(server/unet_adapters.py) while the stack is built; a tenant's state names its U-Net stack
(those patch ids, in order) and each denoiser group activates it. Text-encoder patches
become the tenant's text plan as before; a stack may hold both, in any order (each kind's
patches keep their relative order).

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
from server.errors import RegistryUnavailable, StackNotReady, UnsupportedPatchKind
from server.text_encoding import TextPlan, build_text_plan
from server.unet_adapters import UnetAdapters

logger = logging.getLogger(__name__)

# Dense U-Net weight edits and U-Net modules would need a U-Net copy or a module type per
# stack; LoRA adapters share the one U-Net. The other kinds are refused (422).
SERVABLE_KINDS = ("text_encoder", "unet_lora")


def check_servable_kind(kind: str, label: str) -> None:
    """Refuse patch kinds this server cannot serve yet (422), naming the patch."""
    if kind not in SERVABLE_KINDS:
        raise UnsupportedPatchKind(
            f"{label} is a {kind} patch; this server serves {', '.join(SERVABLE_KINDS)} "
            "patches only"
        )


@dataclass(frozen=True)
class _Plan:
    """What a stack is served with: the text plan and the U-Net adapters' patch ids."""

    text: TextPlan | None
    unet_stack: tuple[str, ...]


@dataclass(frozen=True)
class TenantState:
    """How one tenant is served: its stack and plan, or why it cannot be (fail closed)."""

    tenant: str
    stack: tuple[str, ...] = ()
    tenant_generation: int = 0
    plan: TextPlan | None = None  # None with no failure: no text patch, the base encoder
    unet_stack: tuple[str, ...] = ()  # LoRA patch ids, in stack order
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
        adapters: UnetAdapters | None = None,
    ):
        self.registry = registry
        self.pipe = pipe
        self.events = events or NoEvents()
        self.cache_size = cache_size
        self.adapters = adapters or UnetAdapters(pipe)
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
            plan = self._plan_for(record.stack) or _Plan(None, ())
        except Exception as exc:
            # Whatever goes wrong (a refusal, I/O, torch out of memory), it fails this tenant
            # only: the worker and every other tenant keep serving.
            reason = f"{type(exc).__name__}: {exc}"
            expected = isinstance(exc, (ConceptGuardError, OSError))
            logger.error("tenant %r fails closed: %s", record.tenant, reason, exc_info=not expected)
            self.events.stack_failed(record.tenant, exc)
            return TenantState(record.tenant, record.stack, record.generation, failure=reason)
        self.events.stack_built(record.tenant, reload, time.perf_counter() - started)
        return TenantState(
            record.tenant, record.stack, record.generation, plan.text, plan.unet_stack
        )

    def _plan_for(self, stack: tuple[str, ...]) -> _Plan | None:
        if not stack:
            return None
        if stack in self._plans:
            self._plans.move_to_end(stack)
            return self._plans[stack]
        text, lora = [], []
        for pid in stack:
            patch = self.registry.load_patch(pid)
            check_servable_kind(patch.manifest.kind, f"patch {pid[:12]}")
            patch.verify(self.pipe)
            (lora if patch.manifest.kind == "unet_lora" else text).append(patch)
        text_plan = (
            build_text_plan(self.pipe, compose_weight_stack(self.pipe, text)) if text else None
        )
        # Last: a failure above leaves the U-Net's adapters as they were.
        self.adapters.prepare(lora)
        plan = _Plan(text_plan, tuple(p.id for p in lora))
        self._plans[stack] = plan
        return plan

    def _prune_cache(self) -> None:
        """Keep the plans in use plus the `cache_size` most recently used others; drop
        U-Net adapters no kept plan needs (beyond the adapter cache's spares)."""
        in_use = {s.stack for s in self._snapshot.tenants.values()}
        spare = [stack for stack in self._plans if stack not in in_use]
        for stack in spare[: max(0, len(spare) - self.cache_size)]:
            del self._plans[stack]
        self.adapters.evict({pid for plan in self._plans.values() for pid in plan.unet_stack})
