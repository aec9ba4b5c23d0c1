"""What a patch can target: pipeline families, their components, block lists, fingerprints.

This is the one place that knows how SD 1.x/2.x, SDXL and Flux pipelines are laid out, so
the patch format, the erasure methods and the server never hard-code module paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch

from patches.errors import WrongTarget

Family = Literal["sd", "sdxl", "flux"]
Component = Literal["text_encoder", "text_encoder_2", "unet", "transformer"]

FAMILY_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd": ("text_encoder", "unet"),
    "sdxl": ("text_encoder", "text_encoder_2", "unet"),
    "flux": ("text_encoder", "text_encoder_2", "transformer"),
}
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
DENOISER_COMPONENTS = ("unet", "transformer")

# Fingerprints are kept for each dtype a model is commonly served in, so a patch made on
# float32 weights verifies against the same weights served in float16 or bfloat16.
FINGERPRINT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Block-list suffixes, most specific first: CLIP (`encoder.layers`), T5 (`encoder.block`).
# transformers 5.x dropped the `text_model.` prefix on some classes, so only suffixes are safe.
_BLOCK_LIST_SUFFIXES = ("encoder.layers", "encoder.block")

_PEFT_PARAM_MARKERS = ("lora_", "base_layer.")


def pipeline_family(pipe: object) -> Family:
    """The family of a diffusers pipeline, from its class name, else from its components."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd"
    has = {c for c in ("text_encoder_2", "unet", "transformer") if getattr(pipe, c, None)}
    if "transformer" in has and "text_encoder_2" in has:
        return "flux"
    if "unet" in has and "text_encoder_2" in has:
        return "sdxl"
    if "unet" in has:
        return "sd"
    raise WrongTarget(
        f"cannot tell which family {name} belongs to: expected an SD 1.x/2.x, SDXL or Flux "
        "pipeline (components text_encoder + unet, + text_encoder_2, or + transformer)"
    )


def pipeline_components(pipe: object) -> dict[str, torch.nn.Module]:
    """The patchable components present on `pipe`, by name."""
    family = pipeline_family(pipe)
    found = {}
    for comp in FAMILY_COMPONENTS[family]:
        module = getattr(pipe, comp, None)
        if isinstance(module, torch.nn.Module):
            found[comp] = module
    return found


def get_component(pipe: object, component: str) -> torch.nn.Module:
    """The named component, or a WrongTarget error that lists what the pipeline has."""
    comps = pipeline_components(pipe)
    if component not in comps:
        have = ", ".join(sorted(comps)) or "none"
        raise WrongTarget(
            f"the patch edits '{component}', but this {type(pipe).__name__} "
            f"({pipeline_family(pipe)}) has only: {have}"
        )
    return comps[component]


def denoiser_component(pipe: object) -> str:
    """'unet' for SD/SDXL, 'transformer' for Flux."""
    return "transformer" if pipeline_family(pipe) == "flux" else "unet"


def find_block_list(encoder: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The text encoder's list of transformer blocks and its qualified name."""
    for suffix in _BLOCK_LIST_SUFFIXES:
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.ModuleList) and (
                name == suffix or name.endswith("." + suffix)
            ):
                return name, module
    raise WrongTarget(
        f"{type(encoder).__name__} has no block list ending in "
        f"{' or '.join(_BLOCK_LIST_SUFFIXES)}: is this a CLIP or T5 text encoder?"
    )


def block_parameter_names(encoder: torch.nn.Module, blocks: Iterable[int]) -> list[str]:
    """Parameter names (as in `named_parameters`) of the given block indices."""
    list_name, block_list = find_block_list(encoder)
    names = []
    for index in blocks:
        if not 0 <= index < len(block_list):
            raise WrongTarget(
                f"block {index} does not exist: the encoder has {len(block_list)} blocks "
                f"(0..{len(block_list) - 1})"
            )
        prefix = f"{list_name}.{index}."
        names.extend(n for n, _ in encoder.named_parameters() if n.startswith(prefix))
    return names


def base_named_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters of the base model under their original names.

    peft wraps a LoRA-adapted Linear as `<name>.base_layer` and adds `lora_*` parameters;
    neither changes the base weights, so both are mapped back / skipped here and a loaded
    LoRA leaves the fingerprint untouched.
    """
    for name, param in module.named_parameters():
        if ".lora_" in name or name.startswith("lora_"):
            continue
        yield name.replace(".base_layer.", "."), param


def module_dtype_name(module: torch.nn.Module) -> str:
    """The floating dtype of a module's parameters ('mixed' when they differ)."""
    dtypes = {p.dtype for _, p in base_named_parameters(module) if p.is_floating_point()}
    if len(dtypes) != 1:
        return "mixed"
    dtype = dtypes.pop()
    for key, value in FINGERPRINT_DTYPES.items():
        if value == dtype:
            return key
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous), for hashing."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def hash_named_tensors(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> str:
    """sha256 over (name, dtype, shape, bytes) in name order; `dtype` casts before hashing."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        header = f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n"
        digest.update(header.encode())
        digest.update(tensor_bytes(t))
    return digest.hexdigest()


def _state_key(module: torch.nn.Module) -> tuple:
    # Parameter storage pointers plus autograd version counters change on any in-place edit
    # or reassignment, so this key is a cheap way to know a cached hash is still valid.
    return tuple((n, p.data_ptr(), p._version, p.dtype) for n, p in base_named_parameters(module))


def fingerprint(module: torch.nn.Module, dtype: str | None = None) -> str:
    """Stable hash of a component's parameters, as stored (`dtype=None`) or cast to `dtype`.

    Cached on the module and invalidated by any in-place change to its parameters.
    """
    cache: dict = module.__dict__.setdefault("_conceptguard_fingerprints", {})
    key = _state_key(module)
    hit = cache.get(dtype)
    if hit is not None and hit[0] == key:
        return hit[1]
    torch_dtype = FINGERPRINT_DTYPES[dtype] if dtype is not None else None
    with torch.no_grad():
        digest = hash_named_tensors(base_named_parameters(module), torch_dtype)
    cache[dtype] = (key, digest)
    return digest


def fingerprints_by_dtype(module: torch.nn.Module) -> dict[str, str]:
    """The component's fingerprint for each servable dtype (what a patch manifest records)."""
    return {name: fingerprint(module, name) for name in FINGERPRINT_DTYPES}
