"""`conceptguard patch inspect|verify`: look at a patch file, check it against a model."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from patches.patch import Patch

_DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `conceptguard patch`; returns its subcommands, so that other packages can add
    theirs (the server adds `push`)."""
    parser = subparsers.add_parser("patch", help="inspect, verify or push a patch file")
    commands = parser.add_subparsers(dest="patch_command", metavar="COMMAND", required=True)

    inspect = commands.add_parser("inspect", help="validate a patch file and show its manifest")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=inspect_command)

    verify = commands.add_parser("verify", help="check a patch against a model folder")
    verify.add_argument("file")
    verify.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    verify.add_argument("--dtype", choices=_DTYPES, default="float32")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=verify_command)

    compress = commands.add_parser(
        "compress",
        help="store a text_encoder / unet_weights patch as low-rank deltas in half precision",
        description="Rewrite a weight patch as each matrix's best rank-R delta (a truncated "
        "SVD) stored in half precision: lossy, so measure the result again (bench quality).",
    )
    compress.add_argument("file")
    compress.add_argument("--model", required=True, help="the base the patch was made for")
    compress.add_argument("--rank", type=int, default=128, help="rank per matrix (default 128)")
    compress.add_argument(
        "--store-dtype", choices=_DTYPES, default="float16", help="dtype of the stored deltas"
    )
    compress.add_argument("-o", "--output", required=True, help="patch file to write")
    compress.add_argument("--json", dest="json_out", help="write the report as JSON here")
    compress.set_defaults(func=compress_command)
    return commands


def ranks(patch: Patch) -> dict[str, int]:
    """The rank of each low-rank edit, by layer: a LoRA pair's (lora_A's rows), a dense
    delta's (numerically, as the server factors it); none for overrides and modules."""
    kind, mode = patch.manifest.kind, patch.manifest.mode
    if kind == "unet_lora":
        return {
            name.removesuffix(".lora_A.weight"): int(t.shape[0])
            for name, t in sorted(patch.tensors.items())
            if name.endswith(".lora_A.weight")
        }
    if mode == "lowrank":
        from patches.lowrank import split_lowrank

        factors, _ = split_lowrank(patch.tensors)
        return {name.removesuffix(".weight"): f.rank for name, f in sorted(factors.items())}
    if mode != "delta":
        return {}
    from patches.lowrank import factor_exactly

    return {
        name.removesuffix(".weight"): factor_exactly(t).rank
        for name, t in sorted(patch.tensors.items())
        if t.dim() in (2, 4)
    }


def describe(patch: Patch) -> dict[str, Any]:
    """A JSON-ready summary of a validated patch."""
    return {
        "id": patch.id,
        "file_bytes": len(patch.to_bytes()),
        "tensor_bytes": patch.nbytes,
        "manifest": json.loads(patch.manifest.to_json()),
        "tensors": [
            {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for n, t in sorted(patch.tensors.items())
        ],
        "ranks": ranks(patch),
    }


def _print_summary(info: dict[str, Any]) -> None:
    m = info["manifest"]
    rows = [
        ("id", info["id"]),
        ("kind", f"{m['kind']} ({m['mode']})"),
        ("method", m["method"]),
        ("name", m.get("name") or "-"),
        ("concepts", ", ".join(m["concepts"])),
        ("target", f"{m['target']['family']} / {m['target']['component']}"),
        ("base fingerprint", ", ".join(f"{k} {v[:12]}" for k, v in m["base_fingerprint"].items())),
        ("created", f"{m['created_at']} by conceptguard {m['conceptguard_version']}"),
        ("size", f"{info['file_bytes']} bytes, {len(info['tensors'])} tensors"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if m.get("params"):
        print(f"{'params':<{width}}  {json.dumps(m['params'], sort_keys=True)}")
    if info["ranks"]:
        values = list(info["ranks"].values())
        print(
            f"{'rank':<{width}}  {min(values)}-{max(values)} per layer over "
            f"{len(values)} layers (sum {sum(values)})"
        )
    print()
    name_width = max(len(t["name"]) for t in info["tensors"])
    for t in info["tensors"]:
        name = t["name"].removesuffix(".lowrank_A")
        layer = name.removesuffix(".lora_A.weight").removesuffix(".weight")
        second = t["name"].endswith((".lora_B.weight", ".lowrank_B"))
        rank = info["ranks"].get(layer) if not second else None
        shown = f"  rank {rank}" if rank is not None else ""
        print(f"  {t['name']:<{name_width}}  {t['dtype']:<9} {t['shape']}{shown}")


def inspect_command(args: argparse.Namespace) -> int:
    info = describe(Patch.load(args.file))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_summary(info)
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from patches.loading import load_pipeline

    patch = Patch.load(args.file)
    started = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=args.dtype)
    patch.verify(pipe)
    result = {
        "ok": True,
        "id": patch.id,
        "model": args.model,
        "component": patch.manifest.target.component,
        "dtype": args.dtype,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"ok: patch {patch.id[:12]} fits {args.model} ({result['component']}, {args.dtype})")
    return 0


def compress_command(args: argparse.Namespace) -> int:
    from patches.atomic import atomic_write_json
    from patches.compress import compress_patch
    from patches.loading import load_pipeline

    patch = Patch.load(args.file)
    if args.rank < 1:
        raise SystemExit(f"--rank must be >= 1, not {args.rank}")
    pipe = load_pipeline(args.model)
    compressed, report = compress_patch(patch, pipe, args.rank, args.store_dtype)
    patch_id = compressed.save(args.output)
    print(
        f"wrote {args.output}  {report.bytes / 2**20:.2f} MiB "
        f"(was {report.source_bytes / 2**20:.2f} MiB)  id {patch_id[:16]}\n"
        f"  {len(report.ranks)} matrices at rank <= {args.rank} in {args.store_dtype}, "
        f"largest relative error {report.max_error:.4f}; measure it again "
        "before it replaces the original"
    )
    if args.json_out:
        atomic_write_json(args.json_out, {"id": patch_id, **report.to_json()})
    return 0
