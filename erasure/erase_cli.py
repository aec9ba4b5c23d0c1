"""`conceptguard erase <method>`: make safety patches from a local pipeline."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from erasure.dumo import cli as dumo_cli
    from erasure.erasepro import cli as erasepro_cli
    from erasure.esd import cli as esd_cli
    from erasure.hirm import cli as hirm_cli
    from erasure.uce import cli as uce_cli

    parser = subparsers.add_parser("erase", help="make a concept-erasure patch")
    commands = parser.add_subparsers(dest="erase_command", metavar="METHOD", required=True)
    hirm_cli.add_parser(commands)
    esd_cli.add_parser(commands)
    uce_cli.add_parser(commands)
    erasepro_cli.add_parser(commands)
    dumo_cli.add_parser(commands)
