"""The per-worker patch runtime: what it rebuilds on a registry change, and failing closed, on
every registry backend (a local directory, a real PostgreSQL database)."""

from __future__ import annotations

import time

import pytest
from conftest import lora_patch, text_encoder_patch, unet_weights_patch, wait_for_builds
from registry_backends import BACKENDS, new_registry, overwrite_blob, sql

from patches.local_registry import LocalRegistry
from server.denoiser_routing import DenoiserRouter
from server.errors import RegistryUnavailable, StackNotReady
from server.runtime import PatchRuntime, StackBuilding


class Recorder:
    """RuntimeEvents that remembers what happened."""

    def __init__(self):
        self.built: list[tuple[str, bool]] = []
        self.failed: list[tuple[str, str]] = []
        self.generations: list[int] = []

    def stack_built(self, tenant, reload, seconds):
        self.built.append((tenant, reload))

    def stack_failed(self, tenant, error):
        self.failed.append((tenant, type(error).__name__))

    def generation_seen(self, generation):
        self.generations.append(generation)


@pytest.fixture(params=BACKENDS)
def registry(request, tmp_path):
    return new_registry(request.param, tmp_path)


@pytest.fixture(scope="module")
def patch_files(tiny_sd):
    return {i: text_encoder_patch(tiny_sd, seed=30 + i).to_bytes() for i in range(3)}


def _runtime(registry, pipe):
    events = Recorder()
    return PatchRuntime(registry, pipe, events), events


def test_only_changed_tenants_are_rebuilt(registry, tiny_sd, patch_files):
    ids = [registry.put_patch(patch_files[i], name=f"p{i}").id for i in range(3)]
    registry.set_tenant("a", [ids[0]])
    registry.set_tenant("b", [ids[1]])
    runtime, events = _runtime(registry, tiny_sd)
    first = runtime.refresh(wait=True)
    assert sorted(events.built) == [("a", False), ("b", False)]
    assert first.generation == registry.generation()
    assert (
        runtime.refresh(wait=True) is first
    )  # no change: nothing read beyond a stat, nothing built

    registry.set_tenant("a", [ids[0], ids[2]])
    second = runtime.refresh(wait=True)
    assert events.built[2:] == [("a", True)]
    assert second.state_for("b") is first.state_for("b")
    assert second.state_for("a").stack == (ids[0], ids[2])
    # The snapshot a batch took earlier is untouched: in-flight rows keep their stack.
    assert first.state_for("a").stack == (ids[0],)

    registry.put_patch(patch_files[2], name="p2")  # identical bytes: no write at all
    registry.set_tenant("b", [ids[1]])  # same stack: the tenant's generation does not move
    runtime.refresh(wait=True)
    assert len(events.built) == 3


def test_rollback_reuses_the_built_plan(registry, tiny_sd, patch_files):
    ids = [registry.put_patch(patch_files[i]).id for i in range(2)]
    registry.set_tenant("a", [ids[0]])
    runtime, _ = _runtime(registry, tiny_sd)
    plan = runtime.refresh(wait=True).state_for("a").plan
    registry.set_tenant("a", [ids[1]])
    assert runtime.refresh(wait=True).state_for("a").plan is not plan
    registry.rollback_tenant("a")
    assert runtime.refresh(wait=True).state_for("a").plan is plan


def test_a_corrupt_patch_fails_its_tenant_closed(registry, tiny_sd, patch_files):
    good, bad = (registry.put_patch(patch_files[i]).id for i in range(2))
    overwrite_blob(registry, bad, b"not a patch" * 10)
    registry.set_tenant("a", [bad])
    registry.set_tenant("b", [good])
    runtime, events = _runtime(registry, tiny_sd)
    snapshot = runtime.refresh(wait=True)
    assert events.failed == [("a", "RegistryCorrupt")]
    with pytest.raises(StackNotReady, match="could not be loaded: RegistryCorrupt") as info:
        snapshot.state_for("a").require_ready()
    assert info.value.http_status == 503
    assert snapshot.state_for("b").require_ready() is not None
    # A tenant with no record is the base model by choice, not a failure.
    assert snapshot.state_for("nobody").require_ready().plan is None

    registry.set_tenant("a", [good])  # a working stack brings the tenant back
    assert runtime.refresh(wait=True).state_for("a").require_ready() is not None


def test_failed_tenants_are_retried_on_the_next_generation(registry, tiny_sd, patch_files):
    pid = registry.put_patch(patch_files[0]).id
    overwrite_blob(registry, pid, b"garbage")
    registry.set_tenant("a", [pid])
    runtime, _ = _runtime(registry, tiny_sd)
    assert runtime.refresh(wait=True).state_for("a").failure
    overwrite_blob(registry, pid, patch_files[0])  # repaired where it is stored
    registry.set_tenant("other", [])  # any later write makes workers look again
    assert runtime.refresh(wait=True).state_for("a").failure is None


def test_an_unservable_denoiser_edit_fails_closed(registry, tiny_sd):
    # A full-rank dense edit of conv_in (rank 32) beyond the per-row rank limit.
    pid = registry.put_patch(unet_weights_patch(tiny_sd).to_bytes()).id
    registry.set_tenant("a", [pid])  # the registry CLI does not know what a server serves
    registry.set_tenant("b", [])
    events = Recorder()
    runtime = PatchRuntime(registry, tiny_sd, events, denoiser=DenoiserRouter(tiny_sd, max_rank=8))
    snapshot = runtime.refresh(wait=True)
    assert events.failed == [("a", "WrongTarget")]
    assert "rank 32" in snapshot.state_for("a").failure
    assert snapshot.state_for("b").require_ready()
    assert runtime.denoiser.prepared == [] and runtime.denoiser.layers == {}


def test_denoiser_patches_become_the_tenants_denoiser_stack(registry, tiny_sd, patch_files):
    text = registry.put_patch(patch_files[0]).id
    loras = [registry.put_patch(lora_patch(tiny_sd, seed=s).to_bytes()).id for s in (1, 2)]
    dense = registry.put_patch(unet_weights_patch(tiny_sd).to_bytes()).id
    registry.set_tenant("a", [loras[0], text, dense, loras[1]])
    registry.set_tenant("b", [loras[1]])
    # No spare plans: what no tenant uses is released at once.
    runtime = PatchRuntime(registry, tiny_sd, cache_size=0)
    snapshot = runtime.refresh(wait=True)
    a, b = snapshot.state_for("a"), snapshot.state_for("b")
    assert a.failure is None and a.plan is not None
    assert a.denoiser.patch_ids == (loras[0], dense, loras[1])  # stack order, kinds mixed
    assert b.plan is None and b.denoiser.patch_ids == (loras[1],)
    assert sorted(runtime.denoiser.prepared) == sorted([a.denoiser.patch_ids, (loras[1],)])
    # conv_in carries the dense edit (rank 32); the LoRA layers carry rank 4 + 4.
    assert a.denoiser.rank("conv_in") == 32
    assert {a.denoiser.rank(p) for p in a.denoiser.layers if p != "conv_in"} == {8}
    registry.set_tenant("a", [text])  # nobody uses a's denoiser stack any more: released
    assert runtime.refresh(wait=True).state_for("a").denoiser is None
    assert runtime.denoiser.prepared == [(loras[1],)]
    assert "conv_in" not in runtime.denoiser.layers
    registry.set_tenant("b", [])
    runtime.refresh(wait=True)
    assert runtime.denoiser.prepared == [] and runtime.denoiser.layers == {}
    # The shared denoiser itself was never touched.
    assert not any("lora" in name for name, _ in tiny_sd.unet.named_parameters())


def test_a_patch_for_another_base_fails_closed(registry, tiny_sd, other_sd):
    pid = registry.put_patch(text_encoder_patch(other_sd).to_bytes()).id
    registry.set_tenant("a", [pid])
    runtime, _ = _runtime(registry, tiny_sd)
    assert "BaseFingerprintMismatch" in runtime.refresh(wait=True).state_for("a").failure


def _break_registry(registry):
    if isinstance(registry, LocalRegistry):
        (registry.root / "state.json").write_text("{not json")
    else:
        sql(registry, "DELETE FROM conceptguard.meta")


def test_an_unreadable_registry_fails_every_tenant(registry, tiny_sd, patch_files):
    registry.set_tenant("a", [registry.put_patch(patch_files[0]).id])
    runtime, _ = _runtime(registry, tiny_sd)
    runtime.refresh(wait=True)
    _break_registry(registry)
    snapshot = runtime.refresh(wait=True)
    for tenant in ("a", "nobody"):
        with pytest.raises(RegistryUnavailable) as info:
            snapshot.state_for(tenant)
        assert info.value.http_status == 503


def test_a_changed_stack_builds_off_the_batch_path(registry, tiny_sd, patch_files):
    ids = [registry.put_patch(patch_files[i], name=f"p{i}").id for i in range(3)]
    registry.set_tenant("a", [ids[0]])
    registry.set_tenant("b", [ids[1]])
    runtime, _ = _runtime(registry, tiny_sd)
    before = runtime.refresh(wait=True)
    registry.set_tenant("a", [ids[0], ids[2]])
    during = runtime.refresh()  # returns at once: a's new stack builds on the build thread
    a = during.state_for("a")
    assert a.pending and a.stack == (ids[0], ids[2]) and a.plan is None
    with pytest.raises(StackBuilding):
        a.require_ready()  # never served with its old stack meanwhile
    assert during.state_for("b") is before.state_for("b")  # b is served as it was
    after = runtime.refresh(wait=True)
    assert after.state_for("a").ready and after.state_for("a").plan is not None


def test_failed_stacks_are_retried_after_a_backoff(registry, tiny_sd, patch_files):
    pid = registry.put_patch(patch_files[0]).id
    overwrite_blob(registry, pid, b"garbage")
    registry.set_tenant("a", [pid])
    runtime = PatchRuntime(registry, tiny_sd, retry_s=(1.0, 1.0))
    assert runtime.refresh(wait=True).state_for("a").failure
    overwrite_blob(registry, pid, patch_files[0])  # repaired; the records never change
    assert runtime.refresh(wait=True).state_for("a").failure  # not before the backoff
    deadline = time.monotonic() + 20
    while runtime.refresh(wait=True).state_for("a").failure and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.refresh(wait=True).state_for("a").ready


def test_plans_in_use_follow_the_tenants_as_they_change(registry, tiny_sd, patch_files):
    """The runtime counts each stack's tenants as they change (a refresh must not walk every
    tenant): the count always equals the snapshot's, so no plan a tenant holds is pruned."""
    from collections import Counter

    ids = [registry.put_patch(patch_files[i], name=f"p{i}").id for i in range(3)]
    for name, stack in (("a", [ids[0]]), ("b", [ids[0]]), ("c", [ids[1]])):
        registry.set_tenant(name, stack)
    runtime = PatchRuntime(registry, tiny_sd, cache_size=0)

    def check():
        snapshot = runtime.refresh(wait=True)
        held = Counter(state.stack for state in snapshot.tenants.values())
        assert +runtime._in_use == held
        assert set(runtime._plans) >= {stack for stack in held if stack}

    check()
    registry.set_tenant("a", [ids[2]])
    check()
    registry.set_tenant("b", [ids[2], ids[1]])
    check()
    registry.delete_tenant("c")
    check()
    assert ids[:1] not in [list(s) for s in runtime._plans]  # nobody holds [p0]: pruned


def test_a_change_read_mid_batch_is_served_by_the_next_batch(registry, tiny_sd, patch_files):
    """A stack changed while a batch runs: `prefetch` (between denoising steps) starts its
    build and commits nothing, so the next batch's refresh serves the tenant with its new
    stack at once - without it that refresh only starts the build and holds the tenant
    back for one more batch."""
    ids = [registry.put_patch(patch_files[i], name=f"p{i}").id for i in range(3)]
    registry.set_tenant("a", [ids[0]])
    registry.set_tenant("b", [ids[1]])
    runtime, events = _runtime(registry, tiny_sd)
    in_flight = runtime.refresh(wait=True)  # the snapshot the running batch took
    registry.set_tenant("a", [ids[0], ids[2]])

    runtime.prefetch()
    assert runtime.building and runtime.changes_waiting
    assert runtime.snapshot is in_flight  # nothing committed under the running batch
    assert in_flight.state_for("a").stack == (ids[0],)
    wait_for_builds(runtime)

    registry.set_tenant("b", [ids[2]])  # a later change, read by the refresh itself
    following = runtime.refresh()  # the next batch's: no wait
    assert not runtime.changes_waiting
    a = following.state_for("a").require_ready()
    assert a.stack == (ids[0], ids[2]) and a.plan is not None
    assert following.generation == registry.generation()
    # b's change came after the prefetch: it builds now, and is never served its old stack.
    assert following.state_for("b").pending
    assert runtime.refresh(wait=True).state_for("b").require_ready().stack == (ids[2],)
    assert sorted(events.built[2:]) == [("a", True), ("b", True)]

    # Without a prefetch the first refresh after a change holds the tenant back.
    registry.set_tenant("a", [ids[2], ids[1]])  # a stack never built before
    with pytest.raises(StackBuilding):
        runtime.refresh().state_for("a").require_ready()


def test_prefetched_changes_end_as_one_read_would(registry, tiny_sd, patch_files):
    """Changes read ahead in several parts (tenants created, changed, deleted, patches
    added between them) leave the runtime where one refresh would have: the same tenants
    with the same stacks as a runtime that never read ahead."""
    ids = [registry.put_patch(patch_files[i], name=f"p{i}").id for i in range(2)]
    registry.set_tenant("a", [ids[0]])
    registry.set_tenant("c", [ids[1]])
    runtime, _ = _runtime(registry, tiny_sd)
    runtime.refresh(wait=True)
    registry.set_tenant("b", [ids[1]])
    runtime.prefetch()
    registry.delete_tenant("c")
    new = registry.put_patch(patch_files[2], name="p2").id
    runtime.prefetch()
    registry.set_tenant("a", [new, ids[0]])
    registry.set_tenant("c", [new])  # deleted in one part, back in the next
    runtime.prefetch()
    registry.delete_tenant("b")  # created in one part, deleted in the next
    ahead = runtime.refresh(wait=True)
    fresh = PatchRuntime(registry, tiny_sd).refresh(wait=True)
    assert ahead.generation == fresh.generation == registry.generation()
    assert (
        {n: s.stack for n, s in ahead.tenants.items()}
        == {n: s.stack for n, s in fresh.tenants.items()}
        == {"a": (new, ids[0]), "c": (new,)}
    )
    assert all(s.ready for s in ahead.tenants.values())


def test_a_prefetch_never_hides_an_unreadable_registry(registry, tiny_sd, patch_files):
    """Reading ahead fails quietly (the batch in flight goes on); the next refresh reads the
    registry itself and fails every tenant closed."""
    registry.set_tenant("a", [registry.put_patch(patch_files[0]).id])
    runtime, _ = _runtime(registry, tiny_sd)
    runtime.refresh(wait=True)
    registry.set_tenant("a", [registry.put_patch(patch_files[1]).id])
    runtime.prefetch()
    assert runtime.changes_waiting
    _break_registry(registry)
    runtime.prefetch()  # no exception
    with pytest.raises(RegistryUnavailable):
        runtime.refresh().state_for("a")
