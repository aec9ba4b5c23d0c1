"""`conceptguard registry`: look at and change a patch registry from the command line.

Every command prints a short human-readable answer, or JSON with `--json` (given before the
command: `conceptguard registry --json ls`). Refusals end in one line on stderr (exit 2,
from the dispatcher); `check` exits 1 when it finds problems.

Commands that only read (`ls`, `show`, `check`) never create a registry; `init` creates one
explicitly (`put` and `assign --create` do in a location that holds none). A registry whose
state is missing is refused by every command but `check` and `recover`.

A location is a directory or a PostgreSQL URL (`--dir postgresql://USER@HOST/DB`, or
$CONCEPTGUARD_REGISTRY); URLs are shown without their password. `migrate` copies a whole
registry into a new one, either way, and verifies the copy by content ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patches.errors import RegistryCorrupt, RegistryExists
from patches.registry import (
    PatchRecord,
    Registry,
    TenantRecord,
    open_registry,
    shown_location,
)

ENV_DIR = "CONCEPTGUARD_REGISTRY"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("registry", help="manage the patch registry")
    parser.add_argument(
        "--dir",
        "--registry",
        dest="dir",
        help=f"registry directory or postgresql:// URL (default: ${ENV_DIR}, else ./registry)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    commands = parser.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)

    init = commands.add_parser("init", help="create a new, empty registry")
    init.add_argument(
        "--exist-ok",
        action="store_true",
        help="a readable registry there already is fine (exit 0); a damaged one still is not",
    )
    init.set_defaults(func=init_command)
    commands.add_parser("ls", help="list patches and tenants").set_defaults(func=ls_command)

    put = commands.add_parser("put", help="validate and register a patch file")
    put.add_argument("file")
    put.add_argument("--name", help="patch name (default: from the manifest)")
    put.set_defaults(func=put_command)

    rm = commands.add_parser("rm", help="delete a patch no tenant uses")
    rm.add_argument("ref", help="patch id, id prefix, NAME@VERSION or NAME")
    rm.set_defaults(func=rm_command)

    assign = commands.add_parser("assign", help="set a tenant's patch stack (none: clear it)")
    assign.add_argument("tenant")
    assign.add_argument("refs", nargs="*", metavar="REF", help="patches, applied in order")
    assign.add_argument(
        "--create", action="store_true", help="the tenant has no record yet: make one"
    )
    assign.set_defaults(func=assign_command)

    rollback = commands.add_parser("rollback", help="return a tenant to an earlier stack")
    rollback.add_argument("tenant")
    rollback.add_argument(
        "--to-generation", type=int, help="the history entry to return to (default: previous)"
    )
    rollback.set_defaults(func=rollback_command)

    show = commands.add_parser("show", help="show a tenant's stack and history")
    show.add_argument("tenant")
    show.set_defaults(func=show_command)

    commands.add_parser("check", help="check the registry's consistency").set_defaults(
        func=check_command
    )

    recover = commands.add_parser(
        "recover", help="restore a missing state.json from a copy (a backup, or the moved file)"
    )
    recover.add_argument("--from", dest="source", required=True, metavar="FILE")
    recover.set_defaults(func=recover_command)

    migrate = commands.add_parser(
        "migrate",
        help="copy a whole registry into a new one (directory <-> postgresql://), verified",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="LOCATION")
    migrate.add_argument("--to", dest="target", required=True, metavar="LOCATION")
    migrate.set_defaults(func=migrate_command)


def _location(args: argparse.Namespace) -> str:
    return args.dir or os.environ.get(ENV_DIR) or "registry"


def _open(args: argparse.Namespace, create: bool = False) -> Registry:
    return open_registry(_location(args), create=create)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _stack_refs(registry: Registry, stack: Sequence[str]) -> str:
    refs = {record.id: record.ref for record in registry.list_patches()}
    return " ".join(refs.get(pid, f"{pid[:12]}(deleted)") for pid in stack) or "(base model)"


def _print_patch(record: PatchRecord, generation: int) -> None:
    concepts = ", ".join(record.concepts)
    print(f"{record.ref}  {record.id}")
    print(f"  {record.kind} on {record.target} by {record.method}: {concepts}")
    print(f"  {record.size} bytes, registered {record.registered_at}; generation {generation}")


def _print_tenant(registry: Registry, record: TenantRecord, history: bool = False) -> None:
    print(f"tenant {record.tenant}: {_stack_refs(registry, record.stack)}")
    print(f"  stack set at generation {record.generation}")
    if history:
        rows = [
            (e.generation, e.action, e.at, _stack_refs(registry, e.stack)) for e in record.history
        ]
        print(_table(("GENERATION", "ACTION", "AT", "STACK"), rows))


def ls_command(args: argparse.Namespace) -> int:
    registry = _open(args)
    generation = registry.generation()
    patches, tenants = registry.list_patches(), registry.list_tenants()
    if args.json:
        _print_json(
            {
                "generation": generation,
                "patches": [p.to_dict() for p in patches],
                "tenants": [t.to_dict() for t in tenants],
            }
        )
        return 0
    print(f"registry {shown_location(_location(args))} at generation {generation}\n")
    rows = [
        (p.ref, p.id[:12], p.kind, p.target, ",".join(p.concepts), p.size, p.registered_at)
        for p in patches
    ]
    print(_table(("PATCH", "ID", "KIND", "TARGET", "CONCEPTS", "BYTES", "REGISTERED"), rows))
    print()
    rows = [(t.tenant, t.generation, _stack_refs(registry, t.stack)) for t in tenants]
    print(_table(("TENANT", "GENERATION", "STACK"), rows))
    return 0


def init_command(args: argparse.Namespace) -> int:
    registry = _open(args)
    try:
        registry.create()
    except RegistryExists:
        if not args.exist_ok:
            raise
        registry.snapshot()  # it must also be readable
        print(f"a registry exists at {shown_location(_location(args))} already")
        return 0
    print(f"created an empty registry at {shown_location(_location(args))}")
    return 0


def put_command(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as file:
        registry = _open(args, create=True)
        registered = registry.put_patch_file(file, name=args.name)
    record, generation = registered.record, registry.generation()
    if args.json:
        _print_json({**record.to_dict(), "generation": generation, "created": registered.created})
    else:
        _print_patch(record, generation)
        if not registered.created:
            print("  (registered already: nothing changed)")
    return 0


def rm_command(args: argparse.Namespace) -> int:
    registry = _open(args)
    record = registry.delete_patch(args.ref)
    if args.json:
        _print_json({"deleted": record.to_dict(), "generation": registry.generation()})
    else:
        print(f"deleted {record.ref} ({record.id[:12]})")
    return 0


def _tenant_result(registry: Registry, record: TenantRecord, args: argparse.Namespace) -> int:
    if args.json:
        _print_json({**record.to_dict(), "registry_generation": registry.generation()})
    else:
        _print_tenant(registry, record, history=args.registry_command == "show")
    return 0


def assign_command(args: argparse.Namespace) -> int:
    registry = _open(args, create=args.create)
    record = registry.set_tenant(args.tenant, args.refs, create=args.create)
    return _tenant_result(registry, record, args)


def rollback_command(args: argparse.Namespace) -> int:
    registry = _open(args)
    record = registry.rollback_tenant(args.tenant, args.to_generation)
    return _tenant_result(registry, record, args)


def show_command(args: argparse.Namespace) -> int:
    registry = _open(args)
    return _tenant_result(registry, registry.get_tenant(args.tenant), args)


def check_command(args: argparse.Namespace) -> int:
    registry = _open(args)
    problems = registry.check()
    if args.json:
        _print_json({"ok": not problems, "problems": problems})
    elif problems:
        print("\n".join(problems))
    else:
        n_patches, n_tenants = len(registry.list_patches()), len(registry.list_tenants())
        print(f"ok: generation {registry.generation()}, {n_patches} patches, {n_tenants} tenants")
    return 1 if problems else 0


def recover_command(args: argparse.Namespace) -> int:
    registry = _open(args)
    state = registry.recover(Path(args.source).read_bytes())
    print(
        f"restored the registry's state from {args.source}: generation {state.generation}, "
        f"{len(state.patches)} patches, {len(state.tenants)} tenants"
    )
    problems = registry.check()
    if problems:
        print("`registry check` finds (the tenants using these fail closed):")
        print("\n".join(f"  {problem}" for problem in problems))
    return 0


def migrate(source: Registry, target: Registry) -> dict[str, Any]:
    """Copy `source` whole into `target` (a new, empty registry) and verify the copy: the
    same records, tenants, histories, version counters and generation, and every patch file
    read back from `target` hashing to its id. Stop admin writes to `source` meanwhile."""
    state = source.snapshot()
    target.import_copy(state, source.get_patch_bytes)
    copied = target.snapshot()
    differs = [
        what
        for what, a, b in (
            ("generation", state.generation, copied.generation),
            ("patch records", state.patches, copied.patches),
            ("tenant records", state.tenants, copied.tenants),
            ("version counters", state.versions, copied.versions),
        )
        if a != b
    ]
    differs += [
        f"patch file {pid[:12]}"
        for pid in copied.patches
        if hashlib.sha256(target.get_patch_bytes(pid)).hexdigest() != pid
    ]
    if differs:
        raise RegistryCorrupt(f"the copy differs from its source: {', '.join(differs)}")
    return {
        "generation": state.generation,
        "patches": len(state.patches),
        "tenants": len(state.tenants),
        "verified_files": len(copied.patches),
    }


def migrate_command(args: argparse.Namespace) -> int:
    source = open_registry(args.source, create=False)
    target = open_registry(args.target, create=True)
    report = migrate(source, target)
    source_shown, target_shown = shown_location(args.source), shown_location(args.target)
    if args.json:
        _print_json({**report, "from": source_shown, "to": target_shown})
    else:
        print(
            f"migrated {source_shown} -> {target_shown}: generation {report['generation']}, "
            f"{report['patches']} patches, {report['tenants']} tenants; every patch file "
            "read back and verified by its content id"
        )
    return 0
