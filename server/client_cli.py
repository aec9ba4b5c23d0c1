"""`conceptguard patch push` and `conceptguard tenant set|show|rollback|delete`: the admin API
from the command line (stdlib HTTP, so the client needs nothing the server does not).

The server URL and admin key default to $CONCEPTGUARD_SERVER and $CONCEPTGUARD_ADMIN_KEY.
Any refusal ends in one line naming the HTTP status and the server's reason (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO

from patches.errors import ConceptGuardError

ENV_SERVER = "CONCEPTGUARD_SERVER"
ENV_ADMIN_KEY = "CONCEPTGUARD_ADMIN_KEY"
DEFAULT_SERVER = "http://127.0.0.1:8000"


class ServerRefused(ConceptGuardError):
    """The server answered with an error, or could not be reached."""


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", help=f"server URL (default: ${ENV_SERVER}, else {DEFAULT_SERVER})"
    )
    parser.add_argument("--admin-key", help=f"admin API key (default: ${ENV_ADMIN_KEY})")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")


def add_push_parser(patch_commands: argparse._SubParsersAction) -> None:
    push = patch_commands.add_parser("push", help="upload a patch file to a running server")
    push.add_argument("file")
    push.add_argument("--name", help="patch name (default: from the manifest)")
    _add_connection_args(push)
    push.set_defaults(func=push_command)


def add_tenant_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tenant", help="manage tenants' patch stacks on a server")
    commands = parser.add_subparsers(dest="tenant_command", metavar="COMMAND", required=True)

    set_ = commands.add_parser("set", help="set a tenant's ordered patch stack (none: clear)")
    set_.add_argument("tenant")
    set_.add_argument("refs", nargs="*", metavar="REF", help="patch id, NAME@VERSION or NAME")
    set_.add_argument(
        "--create",
        action="store_true",
        help="the tenant is not configured on the server yet: create its record anyway",
    )
    _add_connection_args(set_)
    set_.set_defaults(func=tenant_set_command)

    delete = commands.add_parser("delete", help="delete a tenant that is not configured")
    delete.add_argument("tenant")
    _add_connection_args(delete)
    delete.set_defaults(func=tenant_delete_command)

    show = commands.add_parser("show", help="show a tenant's stack and history")
    show.add_argument("tenant")
    _add_connection_args(show)
    show.set_defaults(func=tenant_show_command)

    rollback = commands.add_parser("rollback", help="return a tenant to an earlier stack")
    rollback.add_argument("tenant")
    rollback.add_argument("--to-generation", type=int, help="history entry (default: previous)")
    _add_connection_args(rollback)
    rollback.set_defaults(func=tenant_rollback_command)


def _call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: bytes | BinaryIO | None = None,
    content_type: str = "application/json",
    length: int | None = None,
) -> tuple[int, Any]:
    """(HTTP status, JSON answer) of an admin call; ServerRefused for any error answer."""
    server = (args.server or os.environ.get(ENV_SERVER) or DEFAULT_SERVER).rstrip("/")
    key = args.admin_key or os.environ.get(ENV_ADMIN_KEY)
    if not key:
        raise ServerRefused(f"no admin key: pass --admin-key or set ${ENV_ADMIN_KEY}")
    request = urllib.request.Request(server + path, data=body, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        request.add_header("Content-Type", content_type)
    if length is not None:
        request.add_header("Content-Length", str(length))
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServerRefused(f"HTTP {exc.code}: {_reason(exc)}") from None
    except urllib.error.URLError as exc:
        raise ServerRefused(f"cannot reach {server}: {exc.reason}") from None
    except TimeoutError:
        raise ServerRefused(f"{server} did not answer within {args.timeout} s") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    text = exc.read().decode(errors="replace")
    try:
        error = json.loads(text)["error"]
        return f"{error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return text[:300] or exc.reason


def _json_body(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def _print_tenant(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, indent=2))
        return
    stack = ", ".join(pid[:12] for pid in record["stack"]) or "(empty: the base model)"
    print(f"tenant {record['tenant']} at generation {record['generation']}: {stack}")
    for entry in record["history"][-10:]:
        shown = ", ".join(pid[:12] for pid in entry["stack"]) or "(empty)"
        print(f"  {entry['generation']:>6}  {entry['action']:<8}  {entry['at']}  {shown}")


def _tenant_path(tenant: str) -> str:
    return f"/v1/tenants/{urllib.parse.quote(tenant, safe='')}"


def push_command(args: argparse.Namespace) -> int:
    query = "?" + urllib.parse.urlencode({"name": args.name}) if args.name else ""
    # Streamed from the file: urllib sends a file object in blocks.
    with open(args.file, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        path = f"/v1/patches{query}"
        status, record = _call(args, "POST", path, file, "application/octet-stream", size)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        ref = f"{record['name']}@{record['version']}"
        done = "pushed" if status == 201 else "already registered as"
        print(f"{done} {ref} ({record['id'][:12]}, {record['kind']})")
    return 0


def tenant_set_command(args: argparse.Namespace) -> int:
    query = "?create=true" if args.create else ""
    body = _json_body({"patches": args.refs})
    _print_tenant(_call(args, "PUT", _tenant_path(args.tenant) + query, body)[1], args.json)
    return 0


def tenant_show_command(args: argparse.Namespace) -> int:
    _print_tenant(_call(args, "GET", _tenant_path(args.tenant))[1], args.json)
    return 0


def tenant_rollback_command(args: argparse.Namespace) -> int:
    body = _json_body({"to_generation": args.to_generation})
    path = _tenant_path(args.tenant) + "/rollback"
    _print_tenant(_call(args, "POST", path, body)[1], args.json)
    return 0


def tenant_delete_command(args: argparse.Namespace) -> int:
    deleted = _call(args, "DELETE", _tenant_path(args.tenant))[1]["deleted"]
    if args.json:
        print(json.dumps(deleted, indent=2))
    else:
        print(f"deleted tenant {deleted['tenant']} ({len(deleted['history'])} history entries)")
    return 0
