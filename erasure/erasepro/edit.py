"""ErasePro (METHODS.md): per layer of a chain, from shallow to deep,

    W_i* = argmin ||W - W0_i||  s.t.  W X_i = T_i  exactly,

X_i the target prompts' aligned token inputs reaching layer i in the model as edited so far,
T_i what the layer must output for them (the original layer's output for the anchor twins).

- `chain="text"`: mlp.fc2 of the chosen text-encoder blocks (erasure/erasepro/text_chain.py);
  one `text_encoder` patch (mode delta) per encoder the denoiser reads (SDXL: two).
- `chain="unet"`: the denoiser's text key/value projections (erasure/cross_attention.py); one
  `unet_lora` patch of exact factors, served per row. On SD/SDXL U-Nets every projection
  reads the text states, which no U-Net edit changes: the solves are independent and there is
  nothing to recompute, so "progressive" has no content there. On Flux block j reads the text
  stream blocks 0..j-1 produced, and each block's inputs are recaptured after the edits of
  the blocks before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from erasure.closed_form import zero_residual
from erasure.cross_attention import kv_layers, lora_patch, solve_end_point, text_tokens
from erasure.erasepro.config import EraseProConfig
from erasure.erasepro.text_chain import run_chain
from erasure.measure import peak_memory, reset_peak_memory
from erasure.prompts import PromptError
from erasure.text_readout import encoder_slots, token_ids
from patches.patch import Patch
from patches.targets import pipeline_family


@dataclass
class EraseProResult:
    patches: list[Patch]  # text chain: one per text encoder; unet chain: one
    layers: list[dict[str, Any]]  # per edited layer, shallow to deep
    pairs: int  # aligned token pairs (per encoder for the text chain)
    # Per patch, for the verdict: the concept's prompts' shift, each held-out check
    # prompt's drift (text chain: of the final states; unet chain: of the edited layers'
    # outputs) and, for the text chain, the share of the distance to the anchor left.
    checks: list[dict[str, Any]]
    seconds: float
    cpu_seconds: float  # this process's CPU time: the cost on a machine shared with others
    peak_memory_bytes: int
    peak_memory_kind: str
    readouts: list[dict[str, Any]] = field(default_factory=list)  # text chain, per encoder


def _params(config: EraseProConfig) -> dict[str, Any]:
    chain = {"chain": config.chain, "preserve_weight": config.preserve_weight}
    if config.chain == "text":
        chain.update(blocks=sorted(set(config.blocks)), target=config.target)
    return {**chain, "rcond": config.rcond, **config.record()}


def _text_chain(pipe: Any, config: EraseProConfig) -> tuple[list[Patch], list, list, int]:
    if pipeline_family(pipe) == "flux":
        raise PromptError(
            "Flux reads its token sequence from T5, which ErasePro's text chain does not edit "
            "(it edits CLIP encoders): use --chain unet for Flux"
        )
    made, layers, readouts = [], [], []
    for slot in encoder_slots(pipe):
        encoder, tokenizer = getattr(pipe, slot.component), getattr(pipe, slot.tokenizer)
        pairs = config.token_pairs(tokenizer)
        retain_ids = token_ids(tokenizer, config.retain(), encoder.device)
        check = list(config.check_prompts)
        check_ids = token_ids(tokenizer, check, encoder.device) if check else None
        deltas, rows, readout = run_chain(encoder, slot, pairs, retain_ids, config, check_ids)
        if check:
            readout["check_drift"] = dict(zip(check, readout["check_drift"], strict=True))
        layers += rows
        readouts.append(readout)
        made.append(
            Patch.create(
                pipe=pipe,
                kind="text_encoder",
                component=slot.component,
                mode="delta",
                method="erasepro",
                concepts=[c.name for c in config.concepts],
                tensors=deltas,
                name=config.name,
                params=_params(config),
                eval={"layers": rows, "readout": readout},
            )
        )
    return made, layers, readouts, len(pairs)


def _unet_chain(pipe: Any, config: EraseProConfig) -> tuple[list[Patch], list, int, list]:
    layers = kv_layers(pipe)
    targets, anchors = config.prompt_pairs()
    pairs = config.token_pairs(*text_tokens(pipe))

    def solve(w0, x, target, gram):
        return zero_residual(w0, x, target, gram, config.preserve_weight, config.rcond)

    edit = solve_end_point(
        pipe,
        layers,
        targets,
        anchors,
        pairs,
        config.retain(),
        solve,
        progressive=True,
        seed=config.seed,
        check=list(config.check_prompts),
    )
    rows = edit.rows
    patch, ranks = lora_patch(
        pipe,
        edit.deltas,
        method="erasepro",
        concepts=[c.name for c in config.concepts],
        params=_params(config),
        name=config.name,
        eval={"layers": rows},
    )
    for row in rows:
        row.update(ranks.get(row["layer"], {"rank": 0, "dropped": 0.0}))
    checks = {"concept_shift": edit.concept_shift, "check_drift": edit.check_drift}
    return [patch], rows, len(pairs), [checks]


def erase_erasepro(pipe: Any, config: EraseProConfig) -> EraseProResult:
    """ErasePro for `config.concepts` on `pipe` (module doc)."""
    config.check()
    reset_peak_memory(config.device)
    started, cpu_started = time.perf_counter(), time.process_time()
    readouts: list[dict[str, Any]] = []
    with torch.no_grad():
        if config.chain == "text":
            made, layers, readouts, pairs = _text_chain(pipe, config)
            checks = [
                {
                    "concept_shift": r["concept_shift"],
                    "check_drift": r.get("check_drift", {}),
                    "gap_left": r["readout_gap_after"] / max(r["readout_gap_before"], 1e-12),
                }
                for r in readouts
            ]
        else:
            made, layers, pairs, checks = _unet_chain(pipe, config)
    peak, kind = peak_memory(config.device)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return EraseProResult(made, layers, pairs, checks, seconds, cpu, peak, kind, readouts)
