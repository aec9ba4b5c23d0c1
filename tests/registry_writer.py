"""Registry writers for the crash and concurrency tests (run as a script, never imported).

REGISTRY is a directory or a postgresql:// URL (tests/pg_server.py).

    registry_writer.py zygote REGISTRY PATCH_DIR
        Imports the registry (and torch, ~1.5 s) once, then obeys stdin lines:
        `run SEED` forks a writer that loops random puts, deletes, assignments and
        rollbacks forever (the test kills it), answering `pid PID`; `reap PID` waits for
        that writer and answers `reaped PID`. Forking skips the import for every kill.
        A writer prints `ready PID`, then `commit PID {json}` after each committed write.
    registry_writer.py concurrent REGISTRY PATCH_DIR INDEX ASSIGNS
        Prints `ready`, waits for a line on stdin (the barrier), then puts every
        PATCH_DIR/w{INDEX}-*.safetensors and makes ASSIGNS assignments of its own tenants.

Every line is one os.write, so lines from the zygote and its writers never interleave.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import traceback
from pathlib import Path

import patches.patch  # noqa: F401  (import torch before forking, not in every writer)
from patches.errors import NothingToRollBack, PatchNotFound
from patches.registry import is_database_url, open_registry

TENANTS = ("t0", "t1", "t2")


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def write_forever(registry_dir: str, patch_dir: str, seed: int) -> None:
    registry = open_registry(registry_dir)
    files = [path.read_bytes() for path in sorted(Path(patch_dir).glob("*.safetensors"))]
    by_id = {hashlib.sha256(data).hexdigest(): data for data in files}
    rng = random.Random(seed)
    me = os.getpid()
    emit(f"ready {me}")
    while True:
        registered = sorted(r.id for r in registry.list_patches())
        tenants = {t.tenant: t for t in registry.list_tenants()}
        op = rng.choices(("put", "rm", "assign", "rollback"), weights=(35, 20, 30, 15))[0]
        event: dict = {"op": op}
        if op == "put":
            fresh = sorted(set(by_id) - set(registered))
            if not fresh:
                continue
            event["id"] = registry.put_patch(by_id[rng.choice(fresh)]).id
        elif op == "rm":
            used = {pid for t in tenants.values() for pid in t.stack}
            free = [pid for pid in registered if pid not in used]
            if not free:
                continue
            event["id"] = registry.delete_patch(rng.choice(free)).id
        elif op == "assign":
            stack = rng.sample(registered, rng.randint(0, min(3, len(registered))))
            event["tenant"] = rng.choice(TENANTS)
            event["stack"] = list(registry.set_tenant(event["tenant"], stack).stack)
        else:
            if not tenants:
                continue
            event["tenant"] = tenant = rng.choice(sorted(tenants))
            history = tenants[tenant].history
            target = rng.choice([None, history[0].generation, history[-1].generation])
            try:
                event["stack"] = list(registry.rollback_tenant(tenant, target).stack)
            except (NothingToRollBack, PatchNotFound):
                continue
        # A single writer, so the generation now is the one this write committed.
        event["generation"] = registry.generation()
        emit(f"commit {me} {json.dumps(event)}")


def zygote(registry_dir: str, patch_dir: str) -> None:
    if is_database_url(registry_dir):
        import psycopg  # noqa: F401  (imported once, before forking; no connection yet)
    emit("zygote ready")
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "run":
            child = os.fork()
            if child == 0:
                try:
                    write_forever(registry_dir, patch_dir, int(arg))
                except BaseException:
                    emit("error " + traceback.format_exc().replace("\n", " | "))
                finally:
                    os._exit(1)
            emit(f"pid {child}")
        elif command == "reap":
            os.waitpid(int(arg), 0)
            emit(f"reaped {arg}")


def concurrent(registry_dir: str, patch_dir: str, index: int, assigns: int) -> None:
    registry = open_registry(registry_dir)
    files = sorted(Path(patch_dir).glob(f"w{index}-*.safetensors"))
    emit("ready")
    sys.stdin.readline()
    ids: list[str] = []
    for i in range(max(assigns, len(files))):
        if i < len(files):
            ids.append(registry.put_patch(files[i].read_bytes()).id)
        if i < assigns:
            registry.set_tenant(f"w{index}-t{i % 3}", ids[-(i % 3) :] if i % 3 else [])
    emit("done")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "zygote":
        zygote(*rest)
    else:
        concurrent(rest[0], rest[1], int(rest[2]), int(rest[3]))
