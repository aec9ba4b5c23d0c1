"""The per-row denoiser: any mix of tenants' denoiser patches in ONE denoiser call per step.

Every row of a batch gets the base output plus its own stack's contribution
(server/row_routing.py is the mechanism; server/denoiser_stacks.py prepares a stack):
- low-rank adapters: per adapted layer, the factors of every prepared stack sit in slot
  tensors, A [capacity, R, in (, kh, kw)] and B [capacity, out, R], and a per-row slot index
  picks each row's: out = base(x) + B[idx] (A[idx] x), by gather + batched matmul (a grouped
  convolution for a Conv2d's A). Slot 0 is all zeros, the slot of rows whose stack does not
  adapt the layer: their output is the base's, exactly (x + 0 == x). R is a power-of-two
  bucket of the largest rank on the layer and the capacity a power of two, so shapes stay
  static while tenants and patches come and go (what torch.compile / CUDA graphs need);
- added modules (`unet_module`): each runs on the rows that carry it, its residuals
  scatter-added into the U-Net's skip connections and mid block.
Classifier-free guidance's negative half uses the same row's stack. Nothing is switched
between batches: no adapter is activated, no weight copied.

Like vLLM's LoRA manager, the worker owns a bounded set of prepared stacks (one slot each)
and a request only names which it needs; the patch runtime releases the stacks no cached
plan uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from patches.lowrank import LowRank
from patches.patch import Patch
from patches.targets import denoiser_component
from patches.unet_modules import SkipModule, call_inputs, with_residuals
from server.denoiser_stacks import DenoiserStack, LayerShape, build_denoiser_stack
from server.row_routing import rerouted, row_groups, take_rows, tile_rows, tile_subset

DEFAULT_MAX_RANK = 128


def _bucket(n: int) -> int:
    """The power of two at or above `n` (at least 1)."""
    return 1 << max(0, n - 1).bit_length()


class _LayerSlots:
    """One adapted layer's slot tensors."""

    def __init__(self, shape: LayerShape, capacity: int, rank: int, like: torch.Tensor):
        self.shape = shape
        self.a = like.new_zeros((capacity, rank, shape.in_features, *shape.kernel))
        self.b = like.new_zeros((capacity, shape.out_features, rank))
        self.users = 0  # live stacks that adapt this layer

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def bytes_per_slot(self) -> int:
        return (self.a[0].numel() + self.b[0].numel()) * self.a.element_size()

    def resize(self, capacity: int, rank: int) -> None:
        """Grow to `capacity` slots and rank `rank`, keeping what the slots hold (the new
        tensors are complete before they replace the old ones)."""
        a = self.a.new_zeros((capacity, rank, *self.a.shape[2:]))
        b = self.b.new_zeros((capacity, self.b.shape[1], rank))
        a[: self.a.shape[0], : self.a.shape[1]] = self.a
        b[: self.b.shape[0], :, : self.b.shape[2]] = self.b
        self.a, self.b = a, b

    def write(self, slot: int, factors: LowRank | None) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        if factors is not None:
            self.a[slot, : factors.rank] = factors.a.to(self.a)
            self.b[slot, :, : factors.rank] = factors.b.to(self.b)

    def delta(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each row's B (A x), for this layer's input `x` and per-row slots `rows`."""
        a = self.a.index_select(0, rows).to(x.dtype)
        b = self.b.index_select(0, rows).to(x.dtype)
        batch, rank = x.shape[0], self.rank
        if self.shape.kind == "linear":
            flat = x.reshape(batch, -1, self.shape.in_features)
            low = torch.bmm(flat, a.transpose(1, 2))  # [batch, tokens, rank]
            out = torch.bmm(low, b.transpose(1, 2))
            return out.reshape(*x.shape[:-1], self.shape.out_features)
        # A per-row convolution: the rows side by side as groups of one grouped convolution.
        height, width = x.shape[-2:]
        low = F.conv2d(
            x.reshape(1, batch * self.shape.in_features, height, width),
            a.reshape(batch * rank, self.shape.in_features, *self.shape.kernel),
            stride=self.shape.stride,
            padding=self.shape.padding,
            groups=batch,
        )
        out = torch.bmm(b, low.reshape(batch, rank, -1))
        return out.reshape(batch, self.shape.out_features, *low.shape[-2:])


@dataclass
class DenoiserPass:
    """What one routed pipeline call did (read after it)."""

    calls: int = 0  # denoiser forwards: one per diffusion step
    adapted_layers: int = 0
    routed_modules: int = 0


class DenoiserRouter:
    """A worker's prepared denoiser stacks, their slots, and the per-row routing of a call."""

    def __init__(self, pipe: Any, max_rank: int = DEFAULT_MAX_RANK, capacity: int = 8):
        self.pipe = pipe
        self.denoiser = getattr(pipe, denoiser_component(pipe))
        self.like = next(self.denoiser.parameters()).detach()  # dtype and device of slots
        self.max_rank = max_rank
        self.capacity = capacity  # slots, slot 0 (zeros) included
        self.layers: dict[str, _LayerSlots] = {}
        self._stacks: dict[tuple[str, ...], tuple[DenoiserStack, int]] = {}
        self._free = list(range(capacity - 1, 0, -1))

    @property
    def prepared(self) -> list[tuple[str, ...]]:
        return list(self._stacks)

    def memory(self) -> dict[str, int]:
        """Bytes the slot tensors hold: per slot, and in all."""
        per_slot = sum(layer.bytes_per_slot for layer in self.layers.values())
        return {
            "slots": self.capacity,
            "bytes_per_slot": per_slot,
            "bytes": per_slot * self.capacity,
        }

    def build(self, patches: Sequence[Patch], base=None) -> DenoiserStack | None:
        """A stack of these denoiser patches (verified, in stack order), not yet given a
        slot; None when there are none. Touches no slot: may run beside a batch."""
        return build_denoiser_stack(self.pipe, patches, self.max_rank, base)

    def add(self, stack: DenoiserStack) -> DenoiserStack:
        """Give a built stack its slot (the prepared one if its patches have one already).
        Runs between batches, on the thread that routes them."""
        live = self._stacks.get(stack.patch_ids)
        if live is not None:
            return live[0]
        slot = self._allocate(stack) if stack.layers else 0
        self._stacks[stack.patch_ids] = (stack, slot)
        return stack

    def prepare(self, patches: Sequence[Patch]) -> DenoiserStack | None:
        """`build` and `add` at once: the prepared stack of these patches, or None."""
        key = tuple(p.id for p in patches)
        if key in self._stacks:
            return self._stacks[key][0]
        stack = self.build(patches)
        return None if stack is None else self.add(stack)

    def release_unused(self, in_use: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """Free the slots of prepared stacks not in `in_use`; returns their keys."""
        released = [key for key in self._stacks if key not in in_use]
        for key in released:
            stack, slot = self._stacks.pop(key)
            for path in stack.layers:
                layer = self.layers[path]
                layer.write(slot, None)
                layer.users -= 1
                if not layer.users:
                    del self.layers[path]
            if slot:
                self._free.append(slot)
        return released

    def _allocate(self, stack: DenoiserStack) -> int:
        if not self._free:
            grown = self.capacity * 2
            for layer in self.layers.values():
                layer.resize(grown, layer.rank)
            self._free = list(range(grown - 1, self.capacity - 1, -1))
            self.capacity = grown
        slot = self._free.pop()
        written: list[_LayerSlots] = []
        try:
            for path, factors in stack.layers.items():
                layer = self.layers.get(path)
                if layer is None:
                    layer = _LayerSlots(
                        stack.shapes[path], self.capacity, _bucket(factors.rank), self.like
                    )
                    self.layers[path] = layer
                elif factors.rank > layer.rank:
                    layer.resize(self.capacity, _bucket(factors.rank))
                layer.users += 1
                written.append(layer)
                layer.write(slot, factors)
        except BaseException:
            # Out of memory, say: leave every slot as it was, this one free again.
            for layer in written:
                layer.write(slot, None)
                layer.users -= 1
            for path in [p for p, layer in self.layers.items() if not layer.users]:
                del self.layers[path]
            self._free.append(slot)
            raise
        return slot

    def _slot(self, stack: DenoiserStack) -> int:
        live = self._stacks.get(stack.patch_ids)
        if live is None or live[0] is not stack:
            # A released stack's slot may hold another tenant's adapter by now.
            raise RuntimeError(f"denoiser stack {stack.patch_ids!r} is no longer prepared")
        return live[1]

    @contextmanager
    def routing(self, stacks: Sequence[DenoiserStack | None]) -> Iterator[DenoiserPass]:
        """Per-row denoiser patches for the pipeline calls inside the block; `stacks` has
        one entry per image row of the call (None: the base denoiser)."""
        passed = DenoiserPass()
        index = torch.tensor(
            [self._slot(s) if s is not None else 0 for s in stacks],
            device=self.like.device,
        )
        paths = sorted({path for s in stacks if s is not None for path in s.layers})
        output_hooks = {path: self._delta_hook(self.layers[path], index) for path in paths}
        routes = [
            (torch.tensor(rows, device=self.like.device), module)
            for stack, rows in row_groups(stacks)
            if stack is not None
            for module in stack.modules
        ]
        passed.adapted_layers, passed.routed_modules = len(paths), len(routes)
        input_hooks = {"": self._input_hook(passed, routes, len(stacks))}
        with rerouted(self.denoiser, output_hooks=output_hooks, input_hooks=input_hooks):
            yield passed

    @staticmethod
    def _delta_hook(layer: _LayerSlots, index: torch.Tensor):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + layer.delta(args[0], tile_rows(index, output.shape[0]))

        return hook

    @staticmethod
    def _input_hook(
        passed: DenoiserPass,
        routes: list[tuple[torch.Tensor, SkipModule]],
        image_rows: int,
    ):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            passed.calls += 1
            if not routes:
                return args, kwargs
            sample, timestep, states = call_inputs(args, kwargs)
            batch = sample.shape[0]
            down: list[torch.Tensor] | None = None
            mid: torch.Tensor | None = None
            for image, skip_module in routes:
                rows = tile_subset(image, image_rows, batch)
                out = skip_module(
                    sample.index_select(0, rows),
                    take_rows(timestep, rows, batch),
                    states.index_select(0, rows),
                )
                if down is None or mid is None:
                    down = [o.new_zeros((batch, *o.shape[1:])) for o in out.down]
                    mid = out.mid.new_zeros((batch, *out.mid.shape[1:]))
                down = [d.index_add(0, rows, o) for d, o in zip(down, out.down, strict=True)]
                mid = mid.index_add(0, rows, out.mid)
            return args, with_residuals(kwargs, down, mid)

        return hook
