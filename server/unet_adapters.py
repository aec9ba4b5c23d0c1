"""The worker's U-Net LoRA adapters: a bounded cache of prepared adapters in the one shared
U-Net, and the switch between U-Net stacks for each denoiser group of a batch.

Like vLLM's LoRA manager: an adapter is loaded once (named by its patch's content id) and
stays loaded while any tenant's stack uses it, plus up to `spare` recently used others;
a request only names which stack it needs. Switching is `set_adapters` (or `disable_lora`
for the empty stack), which touches no weights: tens of microseconds per layer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from patches.kinds import load_denoiser_lora, lora_pairs
from patches.patch import Patch
from patches.targets import denoiser_component


def adapter_name(patch_id: str) -> str:
    return f"cgs_{patch_id[:16]}"


class UnetAdapters:
    def __init__(self, pipe: Any, spare: int = 8):
        self.pipe = pipe
        self.component = denoiser_component(pipe)  # Flux: the transformer
        self.unet = getattr(pipe, self.component)
        self.spare = spare
        self._loaded: OrderedDict[str, str] = OrderedDict()  # patch id -> adapter name
        self._active: tuple[str, ...] | None = ()  # None: unknown, set explicitly next time

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def prepare(self, patches: Sequence[Patch]) -> None:
        """Load every LoRA patch not loaded yet (validated and verified by the caller)."""
        for patch in patches:
            if patch.id in self._loaded:
                self._loaded.move_to_end(patch.id)
                continue
            lora_pairs(patch.tensors, self.component)  # names checked before peft sees them
            name = adapter_name(patch.id)
            load_denoiser_lora(self.pipe, self.component, patch.tensors, name)
            self._loaded[patch.id] = name
            self._active = None  # loading may change which adapters peft has active

    def activate(self, stack: tuple[str, ...]) -> float:
        """Make `stack` (LoRA patch ids, in order) the U-Net's active adapters; seconds taken."""
        if stack == self._active:
            return 0.0
        started = time.perf_counter()
        if not stack:
            if self._loaded:
                self.unet.disable_lora()
        else:
            missing = [pid[:12] for pid in stack if pid not in self._loaded]
            if missing:
                raise KeyError(f"U-Net adapters not prepared: {', '.join(missing)}")
            self.unet.enable_lora()
            names = [self._loaded[pid] for pid in stack]
            self.unet.set_adapters(names, weights=[1.0] * len(names))
        self._active = stack
        return time.perf_counter() - started

    def evict(self, in_use: Iterable[str]) -> list[str]:
        """Delete adapters no stack uses, beyond the `spare` most recently prepared ones."""
        keep = set(in_use)
        spare = [pid for pid in self._loaded if pid not in keep]
        evicted = spare[: max(0, len(spare) - self.spare)]
        for pid in evicted:
            self.unet.delete_adapters(self._loaded.pop(pid))
            self._active = None
        if evicted and not self._loaded:
            # Unwrap peft's layers, so an adapter-free worker runs the plain U-Net again.
            self.pipe.unload_lora_weights()
            self._active = ()
        return evicted
