"""The registry under kill -9 and under concurrent writers, with real processes, on every
backend: no write a writer reported committed is ever lost, at most the write in flight at
the kill is added, and the database backend never leaves a patch file no record names."""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import lora_patch
from registry_backends import BACKENDS, blob_ids, location

from patches.local_registry import LocalRegistry
from patches.registry import Registry, open_registry

WRITER = Path(__file__).with_name("registry_writer.py")
KILLS = 50
WRITERS, ASSIGNS, PUTS = 4, 15, 5


@pytest.fixture(scope="module")
def crash_patch_dir(tmp_path_factory, make_patch_bytes, tiny_sd) -> Path:
    directory = tmp_path_factory.mktemp("crash-patches")
    for i in range(10):
        (directory / f"te{i:02}.safetensors").write_bytes(make_patch_bytes(100 + i))
        # ~400 KB each: writers spend long enough in blob writes for kills to land there.
        lora = lora_patch(tiny_sd, seed=100 + i, rank=128).to_bytes()
        (directory / f"lora{i:02}.safetensors").write_bytes(lora)
    return directory


@pytest.fixture(scope="module")
def concurrent_patch_dir(tmp_path_factory, make_patch_bytes) -> Path:
    directory = tmp_path_factory.mktemp("concurrent-patches")
    for w in range(WRITERS):
        for j in range(PUTS):
            data = make_patch_bytes(200 + PUTS * w + j)
            (directory / f"w{w}-{j}.safetensors").write_bytes(data)
    return directory


class Lines:
    """Lines from a pipe, each awaited until a deadline (select, no threads, no sleeps)."""

    def __init__(self, stream) -> None:
        self.fd = stream.fileno()
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def next(self, deadline: float) -> str | None:
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.selector.select(remaining):
                return None
            chunk = os.read(self.fd, 1 << 16)
            assert chunk, "the writer zygote closed its output"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


@dataclass
class Seen:
    """What the registry holds: the writer's reported commits applied, or read from disk."""

    generation: int = 0
    patches: set[str] = field(default_factory=set)
    tenants: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def apply(self, event: dict) -> None:
        assert event["generation"] == self.generation + 1, f"generation skipped: {event}"
        self.generation = event["generation"]
        if event["op"] == "put":
            self.patches.add(event["id"])
        elif event["op"] == "rm":
            self.patches.remove(event["id"])
        else:
            self.tenants[event["tenant"]] = tuple(event["stack"])

    @classmethod
    def read(cls, registry: Registry) -> Seen:
        return cls(
            registry.generation(),
            {r.id for r in registry.list_patches()},
            {t.tenant: t.stack for t in registry.list_tenants()},
        )

    def changes_from(self, other: Seen) -> int:
        names = set(self.tenants) | set(other.tenants)
        tenants = sum(self.tenants.get(n) != other.tenants.get(n) for n in names)
        return len(self.patches ^ other.patches) + tenants


def _kill_one_writer(zygote, lines: Lines, seed: int, delay: float) -> list[dict]:
    """Start a writer, SIGKILL it `delay` s after it is ready; its reported commits."""
    events: list[dict] = []
    state = {"pid": None, "ready": False}

    def handle(line: str | None) -> None:
        assert line is not None, "no answer from the writer zygote within 30 s"
        kind, _, rest = line.partition(" ")
        assert kind != "error", rest
        if kind == "pid":
            state["pid"] = int(rest)
        elif kind == "ready":
            state["ready"] = True
        elif kind == "commit":
            events.append(json.loads(rest.partition(" ")[2]))

    zygote.stdin.write(f"run {seed}\n".encode())
    zygote.stdin.flush()
    while state["pid"] is None or not state["ready"]:
        handle(lines.next(time.monotonic() + 30))
    deadline = time.monotonic() + delay
    while (line := lines.next(deadline)) is not None:
        handle(line)
    os.kill(state["pid"], signal.SIGKILL)
    zygote.stdin.write(f"reap {state['pid']}\n".encode())
    zygote.stdin.flush()
    # The zygote answers only after the writer is dead: every commit line came before.
    while (line := lines.next(time.monotonic() + 30)) != f"reaped {state['pid']}":
        handle(line)
    return events


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def test_kill_9_loses_no_committed_write(backend, tmp_path, crash_patch_dir):
    registry_dir = location(backend, tmp_path)
    tmp = tmp_path / "registry" / "tmp"
    zygote = subprocess.Popen(
        [sys.executable, str(WRITER), "zygote", registry_dir, str(crash_patch_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    lines = Lines(zygote.stdout)
    rng = random.Random(20240611)
    seen, commits, in_flight = Seen(), 0, 0
    mid_write = {"blob": 0, "state": 0}  # kills that left a temp file of that kind (local)
    orphans = 0  # files no record names after a kill (the local backend's harmless kind)
    try:
        assert lines.next(time.monotonic() + 60) == "zygote ready"
        for run in range(KILLS):
            events = _kill_one_writer(zygote, lines, run, rng.uniform(0.05, 0.6))
            for event in events:
                seen.apply(event)
            commits += len(events)
            for kind in {
                "state" if ".state.json" in p.name else "blob"
                for p in (tmp.iterdir() if tmp.is_dir() else ())
            }:
                mid_write[kind] += 1
            registry = open_registry(registry_dir, create=False)
            assert registry.check() == [], f"after kill {run}"
            for record in registry.list_patches():
                assert registry.load_patch(record.id).id == record.id
            on_disk = Seen.read(registry)
            stray = blob_ids(registry) - on_disk.patches
            if not isinstance(registry, LocalRegistry):
                assert not stray, f"orphan patch files after kill {run}"
            orphans = max(orphans, len(stray))
            registry.close()
            # Everything reported committed is there; at most the write in flight is added.
            if on_disk.generation == seen.generation:
                assert on_disk == seen, f"after kill {run}"
            else:
                assert on_disk.generation == seen.generation + 1, f"after kill {run}"
                assert on_disk.changes_from(seen) <= 1, f"after kill {run}"
                in_flight += 1
            seen = on_disk
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait()
    assert commits > KILLS, "the writers committed too little to test anything"
    print(f"\n{KILLS} kills, {commits} reported commits, {in_flight} committed unreported,")
    print(f"kills while writing: {mid_write['blob']} a blob, {mid_write['state']} state.json")
    print(f"{backend}: at most {orphans} orphan patch file(s) at once")


def test_concurrent_writers_lose_no_write(backend, tmp_path, concurrent_patch_dir):
    registry_dir = location(backend, tmp_path)
    barrier_read, barrier_write = os.pipe()
    command = [sys.executable, str(WRITER), "concurrent", registry_dir]
    writers = [
        subprocess.Popen(
            [*command, str(concurrent_patch_dir), str(i), str(ASSIGNS)],
            stdin=barrier_read,
            stdout=subprocess.PIPE,
        )
        for i in range(WRITERS)
    ]
    os.close(barrier_read)
    try:
        for writer in writers:
            assert writer.stdout.readline() == b"ready\n"
    finally:
        os.close(barrier_write)  # every writer's readline() returns at once
    for writer in writers:
        out, _ = writer.communicate(timeout=60)
        assert (writer.returncode, out) == (0, b"done\n")

    registry = open_registry(registry_dir, create=False)
    assert registry.check() == []
    assert registry.generation() == WRITERS * (ASSIGNS + PUTS)
    assert len(registry.list_patches()) == WRITERS * PUTS
    tenants = registry.list_tenants()
    assert sorted(t.tenant for t in tenants) == sorted(
        f"w{w}-t{k}" for w in range(WRITERS) for k in range(3)
    )
    # No lost update: every assignment is in its tenant's history.
    assert all(len(t.history) == ASSIGNS // 3 for t in tenants)
    generations = sorted(e.generation for t in tenants for e in t.history)
    assert len(set(generations)) == len(generations) == WRITERS * ASSIGNS
