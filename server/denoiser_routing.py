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

Compiled serving (`compile`): the hooks above are installed per call, on the layers the
batch's stacks adapt, which is what eager serving wants (a batch pays only for its own
adapters) but would make torch.compile retrace for every new mix of layers. Compiled, the
router keeps one hook on every slot layer for its lifetime, reads the forward's per-row
slots from the router (a graph input, set by the call's pre-hook outside the compiled
forward), and never drops a layer whose last stack left (its slots stay zeros). The
forward's batch is padded to a power of two (copies of its first row, slot 0, cut off
again after the forward): diffusers' attention specialises the batch size, so each size
would be its own graph. The traced forward then depends only on the batch bucket, the set
of slot layers (every cross-attention projection from the start: RESERVED_LAYERS), the
slot tensors' shapes (which only grow, in powers of two, from a rank of `COMPILED_RANK`)
and whether routed modules add residuals: tenants and patches that come and go within
them compile nothing (tests/test_compiled_routing.py counts the graphs).
"""

from __future__ import annotations

import re
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
from server.row_routing import (
    pad_rows,
    rerouted,
    row_groups,
    take_rows,
    tile_rows,
    tile_subset,
    unpad_rows,
)

DEFAULT_MAX_RANK = 128
# Compiled serving: the smallest rank bucket of a slot layer. A stack's rank is the sum of
# its patches' ranks on a layer, and a larger bucket retraces the denoiser once per batch
# bucket; 16 holds four rank-4 patches (a slot of SD 1.5's cross-attention projections at
# rank 16 is about 2 MB in fp16).
COMPILED_RANK = 16
# How many graphs of the denoiser's forward dynamo may keep (its default is 8).
COMPILED_GRAPHS = 64
# Compiled serving: layers given slots (zeros) from the start, so that the patches most
# methods make (ESD-x, UCE and ErasePro's U-Net chain: the cross-attention projections)
# never add a layer, and a new layer set retrace nothing. Other layers join when a patch
# first adapts them.
RESERVED_LAYERS = {
    "unet": r"(.*\.)?attn2\.(to_q|to_k|to_v|to_out\.0)",
    "transformer": r"(.*\.)?attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)",
}


def bucket(n: int) -> int:
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
        # The current forward's slot per row, classifier-free guidance's copies included
        # (None: the base denoiser), and compiled serving's lasting hooks.
        self.compiled = False
        self._lasting: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._rows: torch.Tensor | None = None
        self._padded: tuple[int, int] | None = None  # (batch, bucket) of the forward
        self._min_rank = 1

    def compile(
        self, mode: str | None = None, backend: Any = "inductor", rank: int = COMPILED_RANK
    ) -> None:
        """Serve through `torch.compile` (`mode`: its modes, None its default): the
        denoiser's forward is compiled, and routing switches to lasting hooks so that what
        the forward traces does not change with the batch's tenants (module docstring).
        The call's own pre-hook (routed modules) stays outside the compiled forward. Slot
        layers hold at least `rank` (a power of two)."""
        if self.compiled:
            return
        self.compiled = True
        # A layer adapted for the first time gets its hook after the forward was traced:
        # dynamo must see hooks come (by default it does not guard them, and would keep
        # serving the graph without the new layer's adapters). And the graphs this router
        # may need (batch buckets x slot growth x residuals) must not hit the default
        # limit of 8 per function, past which dynamo silently runs the forward eagerly.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, COMPILED_GRAPHS)
        self._min_rank = bucket(rank)
        reserved = RESERVED_LAYERS.get(denoiser_component(self.pipe))
        for path, module in self.denoiser.named_modules():
            if reserved and re.fullmatch(reserved, path) and path not in self.layers:
                shape = LayerShape.of(module, path)
                self.layers[path] = _LayerSlots(shape, self.capacity, self._min_rank, self.like)
        for path, layer in self.layers.items():
            if layer.rank < self._min_rank:
                layer.resize(self.capacity, self._min_rank)
            self._hook_lasting(path, layer)
        self.denoiser.forward = torch.compile(self.denoiser.forward, mode=mode, backend=backend)

    def _layer_hook(self, layer: _LayerSlots):
        """A slot layer's forward hook: each row's B (A x), for the forward's per-row slots
        (set by the call's pre-hook; None outside a routed call: the base layer)."""

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            rows = self._rows
            return output if rows is None else output + layer.delta(args[0], rows)

        return hook

    def _hook_lasting(self, path: str, layer: _LayerSlots) -> None:
        module = self.denoiser.get_submodule(path)
        self._lasting[path] = module.register_forward_hook(self._layer_hook(layer))

    def _drop_layer(self, path: str) -> None:
        del self.layers[path]
        handle = self._lasting.pop(path, None)
        if handle is not None:
            handle.remove()

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
                if not layer.users and not self.compiled:  # compiled: layers only grow
                    self._drop_layer(path)
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
                    rank = bucket(max(factors.rank, self._min_rank))
                    layer = _LayerSlots(stack.shapes[path], self.capacity, rank, self.like)
                    self.layers[path] = layer
                    if self.compiled:
                        self._hook_lasting(path, layer)
                elif factors.rank > layer.rank:
                    layer.resize(self.capacity, bucket(factors.rank))
                layer.users += 1
                written.append(layer)
                layer.write(slot, factors)
        except BaseException:
            # Out of memory, say: leave every slot as it was, this one free again.
            for layer in written:
                layer.write(slot, None)
                layer.users -= 1
            unused = [p for p, layer in self.layers.items() if not layer.users]
            for path in [] if self.compiled else unused:  # compiled: layers only grow
                self._drop_layer(path)
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
        if self.compiled:  # the lasting hooks read the rows the pre-hook sets
            output_hooks = {"": self._unpad_hook}
        else:
            output_hooks = {path: self._layer_hook(self.layers[path]) for path in paths}
        routes = [
            (torch.tensor(rows, device=self.like.device), module)
            for stack, rows in row_groups(stacks)
            if stack is not None
            for module in stack.modules
        ]
        passed.adapted_layers, passed.routed_modules = len(paths), len(routes)
        input_hooks = {"": self._input_hook(passed, routes, index)}
        try:
            with rerouted(self.denoiser, output_hooks=output_hooks, input_hooks=input_hooks):
                yield passed
        finally:
            self._rows = self._padded = None

    def _input_hook(
        self,
        passed: DenoiserPass,
        routes: list[tuple[torch.Tensor, SkipModule]],
        index: torch.Tensor,
    ):
        image_rows = index.shape[0]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            passed.calls += 1
            if routes:
                kwargs = self._add_residuals(routes, image_rows, args, kwargs)
            first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self._rows = tile_rows(index, first.shape[0])  # what the layer hooks read
            if self.compiled:
                args, kwargs = self._pad(args, kwargs)
            return args, kwargs

        return hook

    @staticmethod
    def _add_residuals(
        routes: list[tuple[torch.Tensor, SkipModule]], image_rows: int, args: tuple, kwargs: dict
    ) -> dict:
        """Each routed module run on the rows that carry it, its residuals scatter-added."""
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
        return with_residuals(kwargs, down, mid)

    def _pad(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A compiled forward's inputs (routed modules' residuals included) padded to the
        batch bucket, and its per-row slots (padded rows: slot 0)."""
        rows = self._rows
        batch = rows.shape[0]
        size = bucket(batch)
        self._rows = torch.cat([rows, rows.new_zeros(size - batch)]) if size > batch else rows
        self._padded = (batch, size)
        return pad_rows(args, batch, size), pad_rows(kwargs, batch, size)

    def _unpad_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        batch, size = self._padded or (0, 0)
        return output if batch == size else unpad_rows(output, size, batch)
