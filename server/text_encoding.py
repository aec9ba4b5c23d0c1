"""Multi-tenant text encoding: one encoder forward for a batch whose rows belong to tenants
with different text-encoder patches.

A tenant's `TextPlan` holds, per edited *stage* of an encoder (one transformer block, or the
module owning an edited parameter outside the blocks, such as the final layer norm), a clone
of that stage whose edited parameters are the tenant's and whose other parameters are the
base's own tensors (shared, not copied). Only the edited tensors cost memory per tenant
(plus ~70 KB of Python module objects per cloned block).

Encoding a batch runs the stock encoder forward once. For its duration, each stage that some
tenant in the batch edits is replaced by a routed stand-in (server/row_routing.py) that runs
every tenant group's rows through that group's clone (rows of tenants that do not edit the
stage go through the base stage together) and scatters the results back. Stages no tenant
edits - typically all but one or two early blocks, plus the embeddings and the final norm -
run once for all rows. The replacement is undone in a `finally`, so the shared encoder is
the base again even when the forward raises.

Rows of one group run the same operations on the same weights as `Patch.apply` followed by
the stock encoder; a batch that holds a single group is bit-identical to that reference.
Mixed batches compute each group on a row subset, and CPU kernels may round a subset
differently from the whole (measured: at most ~1.2e-7 absolute on the tiny CLIP).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from patches.errors import WrongTarget
from patches.stacks import ComposedWeights
from patches.targets import find_block_list, get_component, pipeline_family
from server.row_routing import rerouted, row_groups, stage_stand_in


@dataclass(frozen=True)
class TextPlan:
    """One tenant stack's text-encoder overrides: component -> stage path -> stage clone."""

    stages: Mapping[str, Mapping[str, torch.nn.Module]]
    nbytes: int  # bytes held for this tenant (the edited tensors only)


def stage_of(encoder: torch.nn.Module, name: str) -> str:
    """The stage a parameter belongs to: its transformer block, else its owning module."""
    list_name, _ = find_block_list(encoder)
    prefix = list_name + "."
    if name.startswith(prefix):
        index = name[len(prefix) :].split(".", 1)[0]
        return f"{list_name}.{index}"
    owner = name.rpartition(".")[0]
    if not owner:
        raise WrongTarget(
            f"parameter {name!r} sits on the encoder itself, not on a submodule; the "
            "multi-tenant encoder can only override parameters of submodules"
        )
    return owner


def _clone_sharing_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s structure that shares every parameter and buffer tensor."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=shared)


def build_text_plan(pipe: object, composed: Mapping[str, ComposedWeights]) -> TextPlan:
    """A tenant's plan from its composed stack (patches/stacks.py)."""
    stages: dict[str, dict[str, torch.nn.Module]] = {}
    nbytes = 0
    for component, weights in composed.items():
        encoder = get_component(pipe, component)
        by_stage: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights.tensors.items():
            by_stage.setdefault(stage_of(encoder, name), {})[name] = tensor
        clones = {}
        for path, tensors in by_stage.items():
            clone = _clone_sharing_parameters(encoder.get_submodule(path))
            for name, tensor in tensors.items():
                owner, _, leaf = name[len(path) + 1 :].rpartition(".")
                target = clone.get_submodule(owner) if owner else clone
                setattr(target, leaf, torch.nn.Parameter(tensor, requires_grad=False))
                nbytes += tensor.numel() * tensor.element_size()
            clones[path] = clone.eval()
        stages[component] = clones
    return TextPlan(stages=stages, nbytes=nbytes)


# --- running a batch ---------------------------------------------------------------------


@contextmanager
def routed(
    encoder: torch.nn.Module, component: str, plans: Sequence[TextPlan | None]
) -> Iterator[None]:
    """Route each row (one per entry of `plans`) through its plan's stages for one forward."""
    device = next(encoder.parameters()).device
    groups = row_groups(plans)
    edited = [plan.stages.get(component, {}) for plan, _ in groups if plan]
    swaps = {}
    for path in sorted({path for stages in edited for path in stages}):
        routes: list[tuple[list[int], torch.nn.Module | None]] = []
        base_rows: list[int] = []
        for plan, rows in groups:
            module = plan.stages.get(component, {}).get(path) if plan else None
            if module is None:
                base_rows += rows
            else:
                routes.append((rows, module))
        if base_rows:
            routes.append((sorted(base_rows), None))
        swaps[path] = stage_stand_in(encoder.get_submodule(path), routes, len(plans), device)
    with rerouted(encoder, swaps=swaps):
        yield


# --- per-family prompt encoders -----------------------------------------------------------


class PromptEncoder(ABC):
    """Turns (text, tenant plan) rows into the embeddings a pipeline takes instead of text."""

    # Whether the pipeline runs classifier-free guidance with negative embeddings (Flux's
    # guidance is distilled into the transformer: it takes none).
    uses_negative = True
    # Whether an empty negative prompt is zeros rather than the encoded "" (SDXL's
    # force_zeros_for_empty_prompt).
    zero_empty_negative = False

    @abstractmethod
    def encode(self, texts: Sequence[str], plans: Sequence[TextPlan | None]) -> dict[str, Any]:
        """Pipeline keyword arguments for these rows (e.g. {'prompt_embeds': tensor})."""


def _distinct_rows(texts: Sequence[str], plans: Sequence[TextPlan | None]):
    """(rows to encode, index from every row to its encoded row): identical (plan, text)
    rows - the empty negative prompt, above all - run once."""
    position: dict[tuple[int, str], int] = {}
    rows: list[int] = []
    index: list[int] = []
    for row, key in enumerate(zip(map(id, plans), texts, strict=True)):
        if key not in position:
            position[key] = len(rows)
            rows.append(row)
        index.append(position[key])
    return rows, index


def _tokens(tokenizer: Any, texts: list[str], max_length: int | None = None):
    return tokenizer(
        texts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


class SDPromptEncoder(PromptEncoder):
    """SD 1.x/2.x: one CLIP text encoder, last hidden state after the final layer norm, as
    `StableDiffusionPipeline.encode_prompt` computes it (clip_skip unset)."""

    component = "text_encoder"

    def __init__(self, pipe: Any):
        self.tokenizer = pipe.tokenizer
        self.encoder = pipe.text_encoder

    def encode(self, texts: Sequence[str], plans: Sequence[TextPlan | None]) -> dict[str, Any]:
        rows, index = _distinct_rows(texts, plans)
        tokens = _tokens(self.tokenizer, [texts[r] for r in rows])
        device = self.encoder.device
        mask = None
        if getattr(self.encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        with torch.no_grad(), routed(self.encoder, self.component, [plans[r] for r in rows]):
            hidden = self.encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        hidden = hidden.to(dtype=self.encoder.dtype, device=device)
        return {"prompt_embeds": hidden[torch.tensor(index, device=device)]}


def _penultimate_block_output(encoder: torch.nn.Module, ids: torch.Tensor) -> tuple[Any, Any]:
    """(output of the second-to-last block, the encoder's output) for one forward.

    Read with a hook on whatever module sits at that index (a routed stand-in included)
    rather than `output_hidden_states`: transformers records hidden states with hooks on the
    layer classes, which also fire inside per-tenant stage clones and would interleave
    partial-batch entries into the tuple.
    """
    _, blocks = find_block_list(encoder)
    captured: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured["states"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = blocks[-2].register_forward_hook(keep)
    try:
        out = encoder(ids)
    finally:
        handle.remove()
    return captured["states"], out


class SDXLPromptEncoder(PromptEncoder):
    """SDXL: both CLIP encoders' penultimate states side by side, and text_encoder_2's
    projected pooled output, as `StableDiffusionXLPipeline.encode_prompt` (clip_skip unset)."""

    def __init__(self, pipe: Any):
        self.parts = [
            ("text_encoder", pipe.tokenizer, pipe.text_encoder),
            ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2),
        ]
        self.zero_empty_negative = bool(pipe.config.force_zeros_for_empty_prompt)

    def encode(self, texts: Sequence[str], plans: Sequence[TextPlan | None]) -> dict[str, Any]:
        rows, index = _distinct_rows(texts, plans)
        row_plans = [plans[r] for r in rows]
        states, pooled = [], None
        for component, tokenizer, encoder in self.parts:
            ids = _tokens(tokenizer, [texts[r] for r in rows]).input_ids.to(encoder.device)
            with torch.no_grad(), routed(encoder, component, row_plans):
                penultimate, out = _penultimate_block_output(encoder, ids)
            states.append(penultimate)
            pooled = out[0]  # the last encoder's: text_encoder_2's projected pooled output
        device = self.parts[1][2].device
        dtype = self.parts[1][2].dtype
        take = torch.tensor(index, device=device)
        embeds = torch.cat([s.to(device) for s in states], dim=-1).to(dtype)
        return {"prompt_embeds": embeds[take], "pooled_prompt_embeds": pooled.to(dtype)[take]}


class FluxPromptEncoder(PromptEncoder):
    """Flux: CLIP-L's pooled output and T5's token states, as `FluxPipeline.encode_prompt`
    (T5 at the pipeline's default 512 tokens). Either encoder may carry tenants' patches."""

    uses_negative = False
    max_sequence_length = 512

    def __init__(self, pipe: Any):
        self.clip = ("text_encoder", pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_max_length)
        self.t5 = ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2)

    def encode(self, texts: Sequence[str], plans: Sequence[TextPlan | None]) -> dict[str, Any]:
        rows, index = _distinct_rows(texts, plans)
        row_plans, row_texts = [plans[r] for r in rows], [texts[r] for r in rows]
        component, tokenizer, encoder, max_length = self.clip
        ids = _tokens(tokenizer, row_texts, max_length).input_ids.to(encoder.device)
        with torch.no_grad(), routed(encoder, component, row_plans):
            pooled = encoder(ids, output_hidden_states=False).pooler_output.to(encoder.dtype)
        component, tokenizer, t5 = self.t5
        ids = _tokens(tokenizer, row_texts, self.max_sequence_length).input_ids.to(t5.device)
        with torch.no_grad(), routed(t5, component, row_plans):
            states = t5(ids, output_hidden_states=False)[0].to(t5.dtype)
        take = torch.tensor(index, device=t5.device)
        return {
            "prompt_embeds": states[take],
            "pooled_prompt_embeds": pooled.to(t5.device)[take],
            "max_sequence_length": self.max_sequence_length,
        }


def prompt_encoder_for(pipe: Any) -> PromptEncoder:
    """The multi-tenant prompt encoder for `pipe`'s family."""
    family = pipeline_family(pipe)
    if family == "sdxl":
        return SDXLPromptEncoder(pipe)
    if family == "flux":
        return FluxPromptEncoder(pipe)
    return SDPromptEncoder(pipe)
