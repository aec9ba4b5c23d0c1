"""The `conceptguard` command: one entry point, subcommands contributed by each package.

User errors (any ConceptGuardError, a missing file, a bad argument) end in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from conceptguard.quiet import silence_known_warnings
from patches.errors import ConceptGuardError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from bench import bench_cli
    from erasure import erase_cli
    from erasure.attacks import cli as attack_cli
    from patches import patch_cli, registry_cli
    from server import client_cli, serve_cli

    parser = argparse.ArgumentParser(
        prog="conceptguard",
        description="Safe text-to-image serving with hot-swappable concept-erasure patches.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve_cli.add_parser(subparsers)
    client_cli.add_push_parser(patch_cli.add_parser(subparsers))
    client_cli.add_tenant_parser(subparsers)
    registry_cli.add_parser(subparsers)
    erase_cli.add_parser(subparsers)
    attack_cli.add_parser(subparsers)
    bench_cli.add_parser(subparsers)
    return parser


def _version() -> str:
    from patches import __version__

    return f"conceptguard {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    # A local model folder (the embedded one included) never touches the network; a hub id
    # is fetched where this machine may reach a hub (HF_HUB_OFFLINE=1 forbids it).
    silence_known_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConceptGuardError as exc:
        print(f"conceptguard: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"conceptguard: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("conceptguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
