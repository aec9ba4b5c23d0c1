"""Per-row routing: one forward of a shared model over a batch whose rows belong to tenants
with different patches.

This is the one mechanism behind the multi-tenant text encoder (server/text_encoding.py)
and the per-row denoiser (server/denoiser_routing.py). For the duration of one forward,
parts of the shared model are given per-row behaviour, and everything else runs once for
all rows:
- a *stage swap* replaces a submodule by a stand-in that runs each group of rows through its
  own module (gather the group's rows, run, scatter back): text-encoder blocks edited by a
  tenant, run through that tenant's clone of the block;
- a *row hook* adds a per-row contribution to a submodule's output or inputs: the
  denoiser's low-rank deltas (each row's adapter factors picked by a per-row slot index) and
  its routed modules (run on the rows that carry them, scatter-added into the skip
  connections).
Both are installed by `rerouted` and undone in a `finally`, so the shared model is the base
again whatever the forward does.

A forward may see more rows than the batch has image rows: classifier-free guidance stacks
[negative, positive] copies of the same rows, so row r and row r + n are the same image and
take the same route (`tile_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

Hook = Callable[..., Any]


def row_groups(keys: Sequence[object | None]) -> list[tuple[object | None, list[int]]]:
    """Rows grouped by their key's identity (a tenant plan, or None), in first-seen order."""
    groups: dict[int, tuple[object | None, list[int]]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(id(key), (key, []))[1].append(row)
    return list(groups.values())


def _copies(batch: int, image_rows: int) -> int:
    if image_rows == 0 or batch % image_rows:
        raise RuntimeError(
            f"a routed forward saw {batch} rows, not a multiple of the batch's {image_rows} "
            "image rows"
        )
    return batch // image_rows


def tile_rows(index: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row values (one per image row) for a forward over `batch` rows made of whole
    copies of the image rows (classifier-free guidance concatenates [negative, positive])."""
    copies = _copies(batch, index.shape[0])
    return index if copies == 1 else index.repeat(copies)


def tile_subset(rows: torch.Tensor, image_rows: int, batch: int) -> torch.Tensor:
    """The forward rows of some image rows: row r and its copies r + k * image_rows."""
    copies = _copies(batch, image_rows)
    return torch.cat([rows + k * image_rows for k in range(copies)]) if copies > 1 else rows


def take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """`value`'s entries for `rows` when it is a per-row tensor, else `value` unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


# Inputs whose first dimension is not the batch, whatever its size (Flux's position ids).
UNBATCHED = frozenset({"txt_ids", "img_ids"})


def pad_rows(value: Any, batch: int, size: int) -> Any:
    """`value` grown from `batch` to `size` rows with copies of its first row, when it is a
    per-row tensor (or holds some: dicts, tuples and lists entry by entry); anything else
    unchanged. Padded rows are computed and thrown away (`unpad_rows`)."""
    if isinstance(value, torch.Tensor):
        if size == batch or value.dim() == 0 or value.shape[0] != batch:
            return value
        return torch.cat([value, value[:1].expand(size - batch, *value.shape[1:])])
    if isinstance(value, dict):
        return {k: v if k in UNBATCHED else pad_rows(v, batch, size) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(pad_rows(v, batch, size) for v in value)
    return value


def unpad_rows(value: Any, size: int, batch: int) -> Any:
    """A padded forward's output cut back to the batch's rows (diffusers' output classes
    are dicts: rebuilt field by field)."""
    if isinstance(value, torch.Tensor):
        return value[:batch] if value.dim() > 0 and value.shape[0] == size else value
    if isinstance(value, dict):
        return type(value)(**{k: unpad_rows(v, size, batch) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(unpad_rows(v, size, batch) for v in value)
    return value


def scatter_rows(merged: Any, out: Any, rows: torch.Tensor, batch: int) -> Any:
    """Write a group's output (a tensor, or a tuple/list holding tensors) into the batch's."""
    if isinstance(out, torch.Tensor):
        if out.dim() > 0 and out.shape[0] == 1 and len(rows) > 1:
            # Broadcast over the batch (T5's position bias): made per row, so groups whose
            # stage computes it differently each keep their own.
            out = out.expand(len(rows), *out.shape[1:])
        if merged is None:
            merged = out.new_empty((batch, *out.shape[1:]))
        return merged.index_copy_(0, rows, out)
    if isinstance(out, (tuple, list)):
        merged = merged or [None] * len(out)
        return type(out)(
            scatter_rows(m, o, rows, batch) if isinstance(o, torch.Tensor) else o
            for m, o in zip(merged, out, strict=True)
        )
    raise TypeError(f"a routed module returned {type(out).__name__}, not tensors")


class RoutedStage(torch.nn.Module):
    """Stands in for one stage during a forward: each route's rows through its module."""

    def __init__(self, routes: list[tuple[torch.Tensor, torch.nn.Module]], batch: int):
        super().__init__()
        # A plain list, so the route modules are not registered as this module's children.
        self.routes = routes
        self.batch = batch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        merged = None
        for rows, module in self.routes:
            sub_args = [take_rows(a, rows, self.batch) for a in args]
            sub_kwargs = {k: take_rows(v, rows, self.batch) for k, v in kwargs.items()}
            merged = scatter_rows(merged, module(*sub_args, **sub_kwargs), rows, self.batch)
        return merged


def stage_stand_in(
    base: torch.nn.Module,
    routes: Sequence[tuple[list[int], torch.nn.Module | None]],
    batch: int,
    device: torch.device,
) -> torch.nn.Module:
    """What replaces `base` for one forward: routes are (rows, module or None for the base).
    A single route runs as it is, with no gather and no scatter."""
    resolved = [(rows, module or base) for rows, module in routes]
    if len(resolved) == 1:
        return resolved[0][1]
    return RoutedStage(
        [(torch.tensor(rows, device=device), module) for rows, module in resolved], batch
    )


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@contextmanager
def rerouted(
    root: torch.nn.Module,
    swaps: Mapping[str, torch.nn.Module] | None = None,
    output_hooks: Mapping[str, Hook] | None = None,
    input_hooks: Mapping[str, Hook] | None = None,
) -> Iterator[None]:
    """Per-row behaviour for `root`'s forwards inside the block; the base again after it.

    `swaps`: submodule path -> stand-in. `output_hooks`: path -> forward hook
    (module, args, output) -> new output. `input_hooks`: path ('' for `root` itself) ->
    forward pre-hook with keyword arguments (module, args, kwargs) -> (args, kwargs).
    """
    installed: list[tuple[str, torch.nn.Module]] = []
    handles = []
    try:
        for path, stand_in in (swaps or {}).items():
            base = root.get_submodule(path)
            _set_submodule(root, path, stand_in)
            installed.append((path, base))
        for path, hook in (output_hooks or {}).items():
            handles.append(root.get_submodule(path).register_forward_hook(hook))
        for path, hook in (input_hooks or {}).items():
            module = root.get_submodule(path) if path else root
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
        for path, base in reversed(installed):
            _set_submodule(root, path, base)
