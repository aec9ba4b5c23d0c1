"""`conceptguard bench ...`: MiniCanvas training and the benchmarks."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

DEFAULT_WORK = Path.home() / ".cache" / "conceptguard" / "minicanvas-train"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="MiniCanvas training and benchmarks")
    commands = parser.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)

    minicanvas = commands.add_parser("minicanvas", help="the MiniCanvas world and model")
    mc_commands = minicanvas.add_subparsers(
        dest="minicanvas_command", metavar="COMMAND", required=True
    )
    train = mc_commands.add_parser(
        "train", help="train the MiniCanvas pipeline and judges (resumes where it stopped)"
    )
    train.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    train.add_argument("--out", default="models/minicanvas", help="pipeline folder to write")
    train.add_argument(
        "--work", default=str(DEFAULT_WORK), help="stage outputs and checkpoints (resume point)"
    )
    from bench.minicanvas.train import TrainConfig

    for item in fields(TrainConfig):
        if item.type in ("int", int):
            flag = "--" + item.name.replace("_", "-")
            train.add_argument(flag, type=int, default=item.default, help=f"default {item.default}")
    train.set_defaults(func=train_command)

    from bench.minicanvas import quality_cli

    quality_cli.add_parser(commands)

    from bench.minicanvas import erasure_sweep

    erasure_sweep.add_parser(commands)

    # The server benchmarks own their flags; everything after the name is theirs (--help too).
    for name, module in (
        ("serve-load", "bench.serve_load"),
        ("serve-throughput", "bench.serve_throughput"),
        ("hirm-cost", "bench.hirm_cost"),
        ("mixed-stacks", "bench.mixed_stacks"),
        ("complex-prompts", "bench.minicanvas.complex_prompts"),
        ("closed-form-cost", "bench.closed_form_cost"),
        ("registry-scale", "bench.registry_scale"),
        ("gpu-suite", "bench.gpu_suite"),
        ("attack-table", "bench.minicanvas.attack_table"),
        ("attack-calibration", "bench.minicanvas.attack_calibration"),
    ):
        runner = commands.add_parser(
            name, add_help=False, prefix_chars="+", help=f"{module}: see --help"
        )
        runner.add_argument("args", nargs=argparse.REMAINDER)
        runner.set_defaults(func=_delegate(module))


def _delegate(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.args)

    return run


def train_command(args: argparse.Namespace) -> int:
    import torch

    from bench.minicanvas.train import TrainConfig, Trainer

    if args.device == "cuda" and not torch.cuda.is_available():
        print("conceptguard: --device cuda, but no CUDA device is available")
        return 2
    values = {
        item.name: getattr(args, item.name)
        for item in fields(TrainConfig)
        if hasattr(args, item.name) and item.name != "device"
    }
    config = TrainConfig(device=args.device, **values)
    Trainer(config, Path(args.work)).run(Path(args.out))
    return 0
