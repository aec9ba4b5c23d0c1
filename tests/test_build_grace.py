"""A tenant whose stack just changed, in a worker's batch: its new stack is built off the
batch path, and the batch gives that build `batching.build_grace_s`. A quick build is served
in the same batch; with no grace the tenant's rows are held back for a later batch (before
the grace existed they always were: a whole batch more for a build of a few milliseconds).
Either way they never get the old stack, and the other tenant's row is served at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import text_encoder_patch, wait_for_builds

from patches.registry import open_registry
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.schemas import ImageGenerationRequest, WorkItem


@pytest.fixture
def worker_factory(tmp_path, sd_model_path, tiny_sd):
    registry = open_registry(tmp_path / "registry")
    files = [text_encoder_patch(tiny_sd, seed=60 + i).to_bytes() for i in range(3)]
    ids = [registry.put_patch(f).id for f in files]
    registry.set_tenant("a", [ids[0]])
    registry.set_tenant("b", [ids[1]])
    threads = torch.get_num_threads()
    made = []

    def make(grace: float) -> GenerationAPI:
        config = ServerConfig(batching={"build_grace_s": grace, "warm_up_steps": 0})
        model = ModelSettings(str(sd_model_path))
        worker = GenerationAPI(model, config, str(tmp_path / "registry"))
        worker.setup("cpu")
        made.append(worker)
        return worker

    yield registry, ids, make
    for worker in made:
        worker.runtime.close()
    torch.set_num_threads(threads)


def _items(seed: int) -> list[WorkItem]:
    request = ImageGenerationRequest(prompt="a red cat", seed=seed, steps=2)
    return [WorkItem(f"{t}-{seed}", t, request, seed, time.time()) for t in "ab"]


def test_a_quick_build_is_served_in_the_same_batch(worker_factory):
    registry, ids, make = worker_factory
    worker = make(grace=1.0)
    registry.set_tenant("a", [ids[2]])  # the worker has not read this change yet
    a, b = worker.serve_batch(_items(1))
    assert a is not None and a["status"] == 200, a  # not held back for the next batch
    assert a["record"]["patches"] == [ids[2]]
    assert b["status"] == 200 and b["record"]["patches"] == [ids[1]]


def test_without_grace_the_rows_wait_for_a_later_batch(worker_factory):
    registry, ids, make = worker_factory
    worker = make(grace=0.0)
    registry.set_tenant("a", [ids[2]])
    a, b = worker.serve_batch(_items(1))
    assert a is None  # held back: never served with its old stack
    assert b["status"] == 200 and b["record"]["patches"] == [ids[1]]
    wait_for_builds(worker.runtime)
    a, _ = worker.serve_batch(_items(2))
    assert a["status"] == 200 and a["record"]["patches"] == [ids[2]]


def test_a_slow_build_gets_the_grace_once(worker_factory):
    registry, ids, make = worker_factory
    worker = make(grace=1.0)
    runtime = worker.runtime
    gate = threading.Event()
    runtime._builder.submit(gate.wait, 60)  # the one build thread is busy: a's build queues
    try:
        registry.set_tenant("a", [ids[2]])
        started = time.perf_counter()
        a, b = worker.serve_batch(_items(1))
        first = time.perf_counter() - started
        assert a is None and b["status"] == 200  # held back after the grace; b served
        assert first >= 1.0
        started = time.perf_counter()
        a, b = worker.serve_batch(_items(2))
        assert a is None and b["status"] == 200
        assert time.perf_counter() - started < 0.9  # no second grace for the same build
    finally:
        gate.set()
    wait_for_builds(runtime)
    a, _ = worker.serve_batch(_items(3))
    assert a["status"] == 200 and a["record"]["patches"] == [ids[2]]
