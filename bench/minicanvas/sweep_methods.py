"""The methods `bench erasure-sweep` can run: a registry of row builders.

Each entry turns (pipeline, variant, concepts, options, patch cache) into the patches one
table row measures. Adding a method (ErasePro, UCE, DuMo, ...) is one `register(SweepMethod(...))`
with its own builder; the sweep, its tables and `--merge` need no change.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SweepOptions:
    """Method settings the sweep's flags may change (recorded in the result's config)."""

    esd_steps: int | None = None  # None: erasure_settings.py's
    esd_retain_weight: float = 0.0  # 0: no preservation term
    esd_reference: str = "anchor"  # "anchor" (anchored target) or "empty" (published ESD)

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Made:
    """What a builder returns: the patches of one row, how long they took, its report."""

    patches: list
    seconds: float
    report: dict[str, Any]


# (pipeline, variant, concepts, options, patch cache or None) -> the row's patches
Builder = Callable[[Any, str, list[str], SweepOptions, "Path | None"], Made]


@dataclass(frozen=True)
class SweepMethod:
    name: str
    variants: str  # help text: the variants it takes
    build: Builder
    composite: bool = False  # made of other rows' patches (cached as those, not itself)


METHODS: dict[str, SweepMethod] = {}


def register(method: SweepMethod) -> SweepMethod:
    METHODS[method.name] = method
    return method


def make_patches(
    pipe: Any,
    method: str,
    variant: str,
    concepts: list[str],
    options: SweepOptions,
    cache: Path | None = None,
) -> Made:
    """The patches of `method` (a registered name) for MiniCanvas `concepts`.

    `cache`: a folder of patches made before with the same settings (every builder is
    deterministic for its seed), so a stack row reuses the patches its parts' rows made;
    the make time recorded is the original one."""
    entry = METHODS[method]
    if cache is None or entry.composite:
        return entry.build(pipe, variant, concepts, options, cache)
    folder = cache / _cache_key(method, variant, concepts, options)
    if (folder / "made.json").exists():
        from patches.patch import Patch

        record = json.loads((folder / "made.json").read_text())
        patches = [Patch.load(folder / name) for name in record["files"]]
        return Made(patches, record["seconds"], record["report"])
    made = entry.build(pipe, variant, concepts, options, cache)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, patch in enumerate(made.patches):
        patch.save(folder / f"{i}.safetensors")
        files.append(f"{i}.safetensors")
    record = {"files": files, "seconds": made.seconds, "report": made.report}
    (folder / "made.json").write_text(json.dumps(record, default=str))
    return made


def _cache_key(method: str, variant: str, concepts: list[str], options: SweepOptions) -> str:
    # HiRM reads none of the options; ESD reads all of them. The code that makes patches is
    # part of the key: a cache made before a method or its settings changed is never reused
    # (DuMo's gate changed once and the sweep served the old patches).
    relevant = options.record() if method != "hirm" else {}
    text = json.dumps([method, variant, concepts, relevant, code_fingerprint()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


_MAKING_CODE = ("erasure", "patches/skip_eraser.py", "bench/minicanvas/erasure_settings.py",
                "bench/minicanvas/closed_form_settings.py")  # fmt: skip


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the source of everything that makes a sweep's patches."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for part in _MAKING_CODE:
        path = root / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _hirm(pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache) -> Made:
    from bench.minicanvas.erasure_settings import hirm_config
    from erasure.hirm import erase_hirm

    result = erase_hirm(pipe, hirm_config(concepts, variant))
    return Made(result.patches, result.seconds, result.reports[0])


def esd_overrides(options: SweepOptions) -> dict[str, Any]:
    """The sweep's ESD settings that differ from erasure_settings.py's."""
    out: dict[str, Any] = {"anchored": options.esd_reference == "anchor"}
    if options.esd_steps:
        out["steps"] = options.esd_steps
    if options.esd_retain_weight:
        out.update(retain=True, retain_weight=options.esd_retain_weight)
    return out


def _esd(pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache) -> Made:
    from bench.minicanvas.erasure_settings import esd_config
    from erasure.esd import erase_esd

    result = erase_esd(pipe, esd_config(concepts, variant, **esd_overrides(options)))
    return Made([result.patch], result.seconds, result.report)


def _stack(pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache) -> Made:
    """The variant "<hirm variant>+<esd mode>": the HiRM patch then the ESD LoRA, as a tenant
    stack would hold them (each made exactly as its method alone makes it)."""
    hirm_variant, _, esd_mode = variant.partition("+")
    text = make_patches(pipe, "hirm", hirm_variant, concepts, options, cache)
    unet = make_patches(pipe, "esd", esd_mode, concepts, options, cache)
    return Made(
        text.patches + unet.patches,
        text.seconds + unet.seconds,
        {"hirm": text.report, "esd": unet.report},
    )


register(SweepMethod("hirm", "R, S, V", _hirm))
register(SweepMethod("esd", "x, u", _esd))
register(SweepMethod("stack", "<hirm variant>+<esd mode>, e.g. S+x", _stack, composite=True))


def _uce(pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache) -> Made:
    from bench.minicanvas.closed_form_settings import uce_row

    return uce_row(pipe, variant, concepts)


def _erasepro(pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache) -> Made:
    from bench.minicanvas.closed_form_settings import erasepro_row

    return erasepro_row(pipe, variant, concepts)


register(SweepMethod("uce", "all, content, span (aligned token positions)", _uce))
register(SweepMethod("erasepro", "text, unet, text-layer (the chain)", _erasepro))


def _dumo(pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache) -> Made:
    from bench.minicanvas.erasure_settings import dumo_config
    from erasure.dumo import erase_dumo

    result = erase_dumo(pipe, dumo_config(concepts, variant))
    return Made([result.patch], result.seconds, result.report)


register(SweepMethod("dumo", "full, no-tlmo, no-gate, no-prior (ablations)", _dumo))


def _dumo_stack(pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache) -> Made:
    """One DuMo eraser per concept, stacked: the paper's multi-concept mode (the modules'
    residuals sum), each eraser the one the dumo row makes for its concept alone."""
    parts = [make_patches(pipe, "dumo", variant, [c], options, cache) for c in concepts]
    return Made(
        [p for part in parts for p in part.patches],
        sum(part.seconds for part in parts),
        {c: part.report for c, part in zip(concepts, parts, strict=True)},
    )


register(
    SweepMethod(
        "dumo-stack", "as dumo: one eraser per concept, stacked (with --multi)", _dumo_stack,
        composite=True,
    )
)  # fmt: skip


def _hirm_hardened(
    pipe: Any, variant: str, concepts: list[str], options: SweepOptions, cache
) -> Made:
    """HiRM with adversarial rounds (erasure/hirm/hardened.py): "S", or "S+x" for it then
    ESD-x as the stack row makes it."""
    hirm_variant, _, esd_mode = variant.partition("+")
    if esd_mode:
        text = make_patches(pipe, "hirm-hardened", hirm_variant, concepts, options, cache)
        unet = make_patches(pipe, "esd", esd_mode, concepts, options, cache)
        report = {"hirm": text.report, "esd": unet.report}
        return Made(text.patches + unet.patches, text.seconds + unet.seconds, report)
    from bench.minicanvas.erasure_settings import hirm_config
    from erasure.hirm.hardened import Hardening, harden_hirm

    hardened = harden_hirm(pipe, hirm_config(concepts, hirm_variant), Hardening())
    report = {**hardened.result.reports[0], "adversarial_rounds": hardened.rounds}
    return Made(hardened.result.patches, hardened.seconds, report)


register(SweepMethod("hirm-hardened", "S (adversarial rounds), S+x (then ESD-x)", _hirm_hardened))
