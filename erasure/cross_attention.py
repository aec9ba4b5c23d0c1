"""The denoiser end point of closed-form edits: the layers that project text into attention
keys and values, the token vectors they read, the solve over them, and the patch it makes.

- SD 1.x/2.x and SDXL U-Nets: every `attn2.to_k` / `attn2.to_v`. All of them read the same
  input, the text states the pipeline hands the U-Net (SDXL: both encoders' penultimate
  states, concatenated), taken from the pipeline's own `encode_prompt`. No U-Net edit changes
  what another of these layers reads, so the layers are solved independently.
- Flux: the double-stream blocks' context projections `attn.add_k_proj` / `attn.add_v_proj`.
  Block j reads the text stream as blocks 0..j-1 left it, after a timestep-modulated layer
  norm; the inputs are captured with hooks from transformer forwards (seeded latents, a few
  fixed noise levels, the same for target and anchor prompts). A progressive solve (ErasePro)
  edits block by block on a copy and recaptures each block's target inputs through the
  blocks already edited; a one-shot solve (UCE) reads them all from the original. Anchor and
  retain inputs always come from the original.

Edits are dense deltas of rank <= the number of constraints; they are written as a
`unet_lora` patch whose lora_A / lora_B are each delta's exact SVD factors
(patches/lowrank.py), so the file loads with diffusers' `load_lora_weights` and the server
serves it per row as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from erasure.closed_form import Gram, Solve, as_record
from erasure.token_pairs import TokenPairs
from patches.lowrank import LowRank, factor_exactly
from patches.patch import Patch
from patches.targets import denoiser_component, pipeline_family

UNET_SUFFIXES = ("attn2.to_k", "attn2.to_v")
FLUX_SUFFIXES = ("attn.add_k_proj", "attn.add_v_proj")
# Flux inputs are captured at these noise levels (sigma; 1 = pure noise).
FLUX_SIGMAS = (1.0, 0.75, 0.5, 0.25)
FLUX_SIZE = 64  # image side of the captures (the text tokens do not depend on it)
BATCH = 64
# The per-row server's default limit on one layer's adapter rank (server/denoiser_stacks.py).
MAX_RANK = 128

# One layer's solve: (W0, X, target outputs T = W0 Y, retain Gram) -> Solve.
LayerSolve = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Gram], Solve]


def kv_layers(pipe: Any) -> list[str]:
    """Module paths of the denoiser's text key/value projections, in forward order."""
    component = denoiser_component(pipe)
    suffixes = FLUX_SUFFIXES if component == "transformer" else UNET_SUFFIXES
    denoiser = getattr(pipe, component)
    return [
        n
        for n, m in denoiser.named_modules()
        if n.endswith(suffixes) and isinstance(m, torch.nn.Linear)
    ]


def text_tokens(pipe: Any) -> tuple[Any, int]:
    """The tokenizer whose positions the denoiser's text tokens follow (Flux: T5's) and the
    length the pipeline pads its prompts to."""
    if pipeline_family(pipe) == "flux":
        return pipe.tokenizer_2, FluxContext.length(pipe)
    return pipe.tokenizer, pipe.tokenizer.model_max_length


class TextStates:
    """SD / SDXL: every K/V layer reads the text states; U-Net edits never change them."""

    reads_edits = False

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @torch.no_grad()
    def batches(self, prompts: list[str]):
        family = pipeline_family(self.pipe)
        device = self.pipe.text_encoder.device
        for start in range(0, len(prompts), BATCH):
            chunk = prompts[start : start + BATCH]
            if family == "sdxl":
                states = self.pipe.encode_prompt(
                    chunk, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )[0]
            else:
                states = self.pipe.encode_prompt(chunk, device, 1, False)[0]
            yield states.float().cpu()

    def inputs(
        self, denoiser, prompts: list[str], layers: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        states = torch.cat(list(self.batches(prompts)))
        return dict.fromkeys(layers, states)

    def gram(self, denoiser, prompts: list[str], layers: Sequence[str]) -> dict[str, Gram]:
        gram = None
        for states in self.batches(prompts):
            gram = gram or Gram(states.shape[-1])
            gram.add(states)
        return dict.fromkeys(layers, gram)

    def rows(self, pairs: TokenPairs) -> TokenPairs:
        return pairs

    def per_prompt(self, values: torch.Tensor) -> torch.Tensor:
        return values


class FluxContext:
    """Flux: the context projections' inputs, captured from transformer forwards."""

    reads_edits = True
    MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default, and what the server encodes with

    @classmethod
    def length(cls, pipe: Any) -> int:
        return min(cls.MAX_SEQUENCE_LENGTH, pipe.tokenizer_2.model_max_length)

    def __init__(self, pipe: Any, seed: int = 0):
        self.pipe = pipe
        generator = torch.Generator().manual_seed(seed)
        channels = pipe.transformer.config.in_channels // 4
        self.latents, self.image_ids = pipe.prepare_latents(
            1, channels, FLUX_SIZE, FLUX_SIZE, torch.float32, "cpu", generator
        )
        self.prompts = 0  # of the last `inputs` call, for `rows`

    @torch.no_grad()
    def _run(self, transformer, prompts, layers, sink) -> None:
        """sink(layer, inputs [B, tokens, dim]) per layer, per batch, per noise level."""
        handles = [
            transformer.get_submodule(path).register_forward_pre_hook(
                lambda module, args, path=path: sink(path, args[0].detach().float().cpu())
            )
            for path in layers
        ]
        length = self.length(self.pipe)
        first = next(transformer.parameters())
        on = {"device": first.device, "dtype": first.dtype}
        try:
            for start in range(0, len(prompts), BATCH):
                states, pooled, text_ids = self.pipe.encode_prompt(
                    prompts[start : start + BATCH],
                    None,
                    device=self.pipe.text_encoder.device,
                    max_sequence_length=length,
                )
                count = len(states)
                guidance = None
                if transformer.config.guidance_embeds:
                    guidance = torch.full((count,), 3.5, device=first.device)
                for sigma in FLUX_SIGMAS:
                    transformer(
                        hidden_states=self.latents.expand(count, -1, -1).to(**on),
                        timestep=torch.full((count,), sigma, device=first.device),
                        guidance=guidance,
                        pooled_projections=pooled.to(**on),
                        encoder_hidden_states=states.to(**on),
                        txt_ids=text_ids.to(first.device),
                        img_ids=self.image_ids.to(first.device),
                        return_dict=False,
                    )
        finally:
            for handle in handles:
                handle.remove()

    def inputs(
        self, denoiser, prompts: list[str], layers: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        seen: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
        self._run(denoiser, prompts, layers, lambda path, x: seen[path].append(x))
        self.prompts = len(prompts)
        return {p: torch.cat(v) for p, v in seen.items()}

    def gram(self, denoiser, prompts: list[str], layers: Sequence[str]) -> dict[str, Gram]:
        grams: dict[str, Gram] = {}

        def add(path: str, x: torch.Tensor) -> None:
            grams.setdefault(path, Gram(x.shape[-1])).add(x)

        self._run(denoiser, prompts, layers, add)
        return grams

    def per_prompt(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values of `inputs` averaged per prompt (over the noise levels)."""
        levels, prompt_of = len(FLUX_SIGMAS), []
        for start in range(0, self.prompts, BATCH):
            count = min(BATCH, self.prompts - start)
            prompt_of += list(range(start, start + count)) * levels
        index = torch.tensor(prompt_of)
        total = torch.zeros(self.prompts).index_add_(0, index, values.float().cpu())
        return total / levels

    def rows(self, pairs: TokenPairs) -> TokenPairs:
        """`pairs` re-indexed to the rows of `inputs` (each batch once per noise level)."""
        levels, out = len(FLUX_SIGMAS), []
        for start in range(0, self.prompts, BATCH):
            count = min(BATCH, self.prompts - start)
            chosen = pairs.index[(pairs.index[:, 0] >= start) & (pairs.index[:, 0] < start + count)]
            for level in range(levels):
                shifted = chosen.clone()
                shifted[:, 0] += start * (levels - 1) + level * count
                out.append(shifted)
        return TokenPairs(pairs.target_ids, pairs.anchor_ids, torch.cat(out))


def input_source(pipe: Any, seed: int = 0) -> TextStates | FluxContext:
    return FluxContext(pipe, seed) if pipeline_family(pipe) == "flux" else TextStates(pipe)


def _groups(layers: Sequence[str]) -> list[list[str]]:
    """Layers by the attention they belong to (a key and its value), in forward order."""
    groups: dict[str, list[str]] = {}
    for path in layers:
        groups.setdefault(path.rsplit(".", 1)[0], []).append(path)
    return list(groups.values())


@dataclass
class EndPointEdit:
    deltas: dict[str, torch.Tensor]  # module path -> [out, in]
    rows: list[dict[str, Any]]  # per layer, in forward order: the solve's figures
    concept_shift: float  # relative change of the layers' outputs on the concept's prompts
    check_drift: dict[str, float]  # the same per held-out check prompt


def _output_change(source, original, prompts: list[str], layers, deltas) -> torch.Tensor:
    """Per prompt: the edits' relative change of each layer's output, averaged over tokens
    and layers, on the original inputs."""
    inputs = source.inputs(original, prompts, layers)
    total = None
    for path in layers:
        w0 = original.get_submodule(path).weight.detach().float().cpu()
        parts = []
        for chunk in inputs[path].split(BATCH):
            base = (chunk @ w0.T).norm(dim=-1).clamp_min(1e-8)
            parts.append(((chunk @ deltas[path].T).norm(dim=-1) / base).mean(1))
        per_row = torch.cat(parts)
        total = per_row if total is None else total + per_row
    return source.per_prompt(total / len(layers))


def solve_end_point(
    pipe: Any,
    layers: Sequence[str],
    targets: list[str],
    anchors: list[str],
    pairs: TokenPairs,
    retain: list[str],
    solve: LayerSolve,
    progressive: bool,
    seed: int = 0,
    check: Sequence[str] = (),
) -> EndPointEdit:
    """Solve every layer of `layers` (module doc). `progressive`: where inputs depend on
    edited layers (Flux), edit attention by attention on a copy and recapture the next
    one's target inputs through the edited ones; else read them all from the original
    denoiser. The retain prompts' inputs come from the original: where they should stay.
    `check`: held-out prompts whose output change is reported beside the concept's."""
    source = input_source(pipe, seed)
    original = getattr(pipe, denoiser_component(pipe))
    recapture = progressive and source.reads_edits
    work = copy.deepcopy(original).float() if recapture else original
    anchor_inputs = source.inputs(original, anchors, layers)
    rows = source.rows(pairs)
    deltas, records = {}, []
    fixed_targets = None if recapture else source.inputs(original, targets, layers)
    grams = source.gram(original, retain, layers)
    for group in _groups(layers):
        target_inputs = fixed_targets or source.inputs(work, targets, group)
        for path in group:
            w0 = original.get_submodule(path).weight.detach().float().cpu()
            x, y = rows.gather(target_inputs[path], anchor_inputs[path])
            result = solve(w0, x, w0.double() @ y.double(), grams[path])
            deltas[path] = result.delta
            relative = result.norm / float(w0.norm())
            records.append({"layer": path, **as_record(result), "delta_relative": relative})
        if recapture:
            with torch.no_grad():
                for path in group:
                    weight = work.get_submodule(path).weight
                    weight += deltas[path].to(weight.device, weight.dtype)
    shift = float(_output_change(source, original, targets, layers, deltas).mean())
    drift = {}
    if check:
        values = _output_change(source, original, list(check), layers, deltas)
        drift = dict(zip(check, values.tolist(), strict=True))
    return EndPointEdit(deltas, records, shift, drift)


def lora_patch(
    pipe: Any,
    deltas: dict[str, torch.Tensor],
    *,
    method: str,
    concepts: list[str],
    params: dict[str, Any],
    name: str | None,
    eval: dict[str, Any] | None,
    max_rank: int = MAX_RANK,
) -> tuple[Patch, dict[str, dict[str, float]]]:
    """A `unet_lora` patch holding the exact factors of each layer's dense delta (module path
    -> [out, in]); layers left unchanged are left out. A delta of rank above `max_rank` (the
    per-row server's limit) keeps its `max_rank` largest singular directions, the best
    approximation of that rank; per layer the result says the rank and the share of the
    delta that was dropped (0 when exact)."""
    component = denoiser_component(pipe)
    tensors, layers = {}, {}
    for path, delta in deltas.items():
        factors = factor_exactly(delta, label=path)
        if factors.rank == 0:
            continue
        dropped = 0.0
        if factors.rank > max_rank:
            kept = LowRank(factors.a[:max_rank].contiguous(), factors.b[:, :max_rank].contiguous())
            dropped = float((factors.dense() - kept.dense()).norm() / factors.dense().norm())
            factors = kept
        tensors[f"{component}.{path}.lora_A.weight"] = factors.a
        tensors[f"{component}.{path}.lora_B.weight"] = factors.b
        layers[path] = {"rank": factors.rank, "dropped": dropped}
    patch = Patch.create(
        pipe=pipe,
        kind="unet_lora",
        component=component,
        method=method,
        concepts=concepts,
        tensors=tensors,
        name=name,
        params={**params, "ranks": {p: v["rank"] for p, v in layers.items()}, "max_rank": max_rank},
        eval=eval,
    )
    return patch, layers
