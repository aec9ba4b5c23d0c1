"""HiRM training: a copy of the text encoder learns, only in its configured blocks, to send
prompts naming the concept somewhere else at the states the denoiser reads.

Loss (each term divided by the base's mean squared token norm, so settings carry across
encoder widths):
- erase: mean over target prompts and token positions 1.. of ||h_t - target_t||^2;
  R: target = c * r_t (fixed seeded random unit vectors);
  S: target = c * h0_t(prompt with the concept replaced by its anchor);
  V: target = h0_t(prompt) - eta * V_t, V the token-wise mean difference over prompt pairs.
- keep: the empty prompt's states, all positions, stay at the base's. Its first state is the
  start token's, identical in every prompt, and the whole of it is the unconditional input of
  classifier-free guidance, so both reach every generation.
- retain (optional): ||h_t - h0_t||^2 on unrelated prompts, all positions.
The pipeline's own encoder is never touched: training runs on a float32 copy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from erasure.hirm.config import GAP_TARGET, R_SCALE, HirmConfig
from erasure.measure import peak_memory, reset_peak_memory
from erasure.prompts import expand, pairs
from erasure.text_readout import (
    EncoderSlot,
    encoder_slots,
    read_states,
    read_states_batched,
    token_ids,
)
from patches.patch import Patch
from patches.targets import block_parameter_names


@dataclass
class HirmResult:
    patches: list[Patch]  # one per text encoder (two for SDXL)
    reports: list[dict[str, Any]]  # per encoder: losses and text-side metrics
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda_allocated" or "process_rss"


@dataclass
class _Prompts:
    targets: list[str]
    concept_of: list[int]  # index into config.concepts, per target prompt
    anchored: list[str]  # S: aligned with targets
    pairs: list[list[tuple[str, str]]]  # V: per concept
    probes: list[str]  # concept-free prompts for the drift report when no retain set is given


def _prompts(config: HirmConfig) -> _Prompts:
    templates = config.resolved_templates()
    targets, concept_of, anchored, all_pairs, probes = [], [], [], [], []
    for index, concept in enumerate(config.concepts):
        prompt_set = expand(concept, templates)
        targets += prompt_set.prompts
        concept_of += [index] * len(prompt_set.prompts)
        anchored += prompt_set.anchored
        concept_pairs = pairs(concept, templates)
        all_pairs.append(concept_pairs)
        probes += [without for _, without in concept_pairs]
    if config.pairs:
        all_pairs = [list(config.pairs)] * len(config.concepts)
    names = [c.name for c in config.concepts]
    for name, prompt, twin in config.adversarial:
        targets.append(prompt)
        anchored.append(twin)
        concept_of.append(names.index(name))
    return _Prompts(targets, concept_of, anchored, all_pairs, sorted(set(probes)))


def _squared(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (h - target).pow(2).sum(-1).mean()


def _relative_change(h: torch.Tensor, h0: torch.Tensor) -> float:
    return float(((h - h0).norm(dim=-1) / h0.norm(dim=-1).clamp_min(1e-8)).mean())


class _SlotTrainer:
    """Trains one encoder of the pipeline (one slot) and reports on it."""

    def __init__(self, pipe: Any, slot: EncoderSlot, config: HirmConfig, prompts: _Prompts):
        self.slot, self.config, self.prompts = slot, config, prompts
        self.base = getattr(pipe, slot.component)
        self.tokenizer = getattr(pipe, slot.tokenizer)
        self.encoder = copy.deepcopy(self.base).float().to(config.device).eval()
        self.encoder.requires_grad_(False)
        self.names = block_parameter_names(self.encoder, config.blocks)
        params = dict(self.encoder.named_parameters())
        self.trainable = [params[n].requires_grad_(True) for n in self.names]

    def _ids(self, prompts: list[str]) -> torch.Tensor:
        return token_ids(self.tokenizer, prompts, self.config.device)

    def _states(self, prompts: list[str]) -> torch.Tensor:
        return read_states_batched(self.encoder, self._ids(prompts), self.slot.layer)

    def _targets(self, h0: torch.Tensor, norm: float) -> torch.Tensor:
        c, p = self.config, self.prompts
        if c.variant == "R":
            generator = torch.Generator().manual_seed(c.seed)
            r = torch.randn(h0.shape[1:], generator=generator).to(h0)
            r = r / r.norm(dim=-1, keepdim=True)
            scale = c.scale if c.scale is not None else R_SCALE * norm
            return (scale * r).expand_as(h0)
        if c.variant == "S":
            scale = c.scale if c.scale is not None else 1.0
            return scale * self._states(p.anchored)
        vectors = []
        for concept_pairs in p.pairs:
            with_states = self._states([a for a, _ in concept_pairs])
            without_states = self._states([b for _, b in concept_pairs])
            vectors.append((with_states - without_states).mean(0))
        v = torch.stack(vectors)[torch.tensor(p.concept_of)]
        return h0 - c.eta * v

    def run(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        c, p = self.config, self.prompts
        started = time.perf_counter()
        ids = self._ids(p.targets)
        h0 = read_states_batched(self.encoder, ids, self.slot.layer)
        norm2 = float(h0[:, 1:].pow(2).sum(-1).mean())
        targets = self._targets(h0, norm2**0.5)
        empty_ids = self._ids([""])
        empty_h0 = read_states_batched(self.encoder, empty_ids, self.slot.layer)
        retain_ids = self._ids(list(c.retain_prompts)) if c.retain_prompts else None
        retain_h0 = (
            read_states_batched(self.encoder, retain_ids, self.slot.layer)
            if retain_ids is not None
            else None
        )
        probe_h0 = self._states(p.probes)  # drift report when there is no retain set
        check_h0 = self._states(list(c.check_prompts)) if c.check_prompts else None
        generator = torch.Generator().manual_seed(c.seed + 1)
        weight = c.resolved_retain_weight()

        def step_loss() -> tuple[torch.Tensor, float]:
            h = read_states(self.encoder, ids, self.slot.layer)
            erase = _squared(h[:, 1:], targets[:, 1:]) / norm2
            empty = read_states(self.encoder, empty_ids, self.slot.layer)
            # The start token is one position of 77 in the empty prompt: held on its own too.
            keep = (_squared(empty, empty_h0) + _squared(h[:, 0], h0[:, 0])) / norm2
            loss = erase + weight * keep
            if retain_ids is not None:
                pick = torch.randperm(len(retain_ids), generator=generator)[: c.retain_batch]
                pick = pick.to(c.device)
                retained = read_states(self.encoder, retain_ids[pick], self.slot.layer)
                loss = loss + weight * _squared(retained, retain_h0[pick]) / norm2
            return loss, erase.item()

        lr = c.resolved_lr(h0.shape[-1])
        optimizer = torch.optim.Adam(self.trainable, lr=lr)
        least, most = c.step_range()
        first_loss = last_loss = erase_start = None
        gap = 1.0
        bar = tqdm(
            total=most,
            desc=f"HiRM-{c.variant} {self.slot.component}",
            unit="step",
            disable=not c.progress,
            mininterval=1,
        )
        steps = 0
        while steps < most and (steps < least or gap > GAP_TARGET):
            loss, erase = step_loss()
            erase_start = erase if erase_start is None else erase_start
            # The erase term is a mean squared distance: its root tracks the relative gap.
            gap = (erase / erase_start) ** 0.5 if erase_start > 0 else 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            last_loss = loss.item()
            first_loss = last_loss if first_loss is None else first_loss
            bar.update()
            bar.set_postfix(loss=f"{last_loss:.4f}", gap=f"{gap:.3f}", refresh=False)
        bar.close()
        report = self._report(h0, targets, retain_h0, retain_ids, probe_h0)
        if check_h0 is not None:
            report["check_drift"] = self._check_drift(check_h0)
        with torch.no_grad():
            empty = read_states(self.encoder, empty_ids, self.slot.layer)
        report["empty_prompt_drift"] = round(_relative_change(empty, empty_h0), 8)
        report.update(
            component=self.slot.component,
            layer=self.slot.layer,
            trained_parameters=sum(t.numel() for t in self.trainable),
            prompts=len(p.targets),
            lr=lr,
            steps=steps,
            loss_first=round(first_loss, 6),
            loss_last=round(last_loss, 6),
            seconds=round(time.perf_counter() - started, 3),
        )
        # Stored in the served dtype: an override replaces the base tensor as it is held.
        params = dict(self.encoder.named_parameters())
        tensors = {
            n: params[n].detach().to("cpu", self.base.dtype).contiguous() for n in self.names
        }
        return tensors, report

    @torch.no_grad()
    def _check_drift(self, check_h0: torch.Tensor) -> dict[str, float]:
        """Per held-out check prompt: the relative change of its token states."""
        h = self._states(list(self.config.check_prompts))
        per_prompt = ((h - check_h0).norm(dim=-1) / check_h0.norm(dim=-1).clamp_min(1e-8)).mean(1)
        return {
            q: round(float(d), 6)
            for q, d in zip(self.config.check_prompts, per_prompt, strict=True)
        }

    @torch.no_grad()
    def _report(self, h0, targets, retain_h0, retain_ids, probe_h0) -> dict[str, Any]:
        p = self.prompts
        h = self._states(p.targets)
        gap_before = _relative_change(h0[:, 1:], targets[:, 1:])
        gap_after = _relative_change(h[:, 1:], targets[:, 1:])
        if retain_ids is not None:
            drift_on = "retain prompts"
            retained = read_states_batched(self.encoder, retain_ids, self.slot.layer)
            drift = _relative_change(retained, retain_h0)
        else:
            drift_on = "concept-free twins of the target prompts"
            drift = _relative_change(self._states(p.probes), probe_h0)
        return {
            "target_displacement": round(_relative_change(h[:, 1:], h0[:, 1:]), 6),
            "target_gap_before": round(gap_before, 6),
            "target_gap_after": round(gap_after, 6),
            "retain_drift": round(drift, 6),
            "retain_drift_on": drift_on,
            "start_token_drift": round(_relative_change(h[:, 0], h0[:, 0]), 8),
        }


def erase_hirm(pipe: Any, config: HirmConfig) -> HirmResult:
    """Train HiRM for `config.concepts` on `pipe`; returns one patch per text encoder."""
    config.check()
    torch.manual_seed(config.seed)
    reset_peak_memory(config.device)
    started = time.perf_counter()
    prompts = _prompts(config)
    made, reports = [], []
    for slot in encoder_slots(pipe):
        tensors, report = _SlotTrainer(pipe, slot, config, prompts).run()
        reports.append(report)
        made.append(
            Patch.create(
                pipe=pipe,
                kind="text_encoder",
                component=slot.component,
                method="hirm",
                concepts=[c.name for c in config.concepts],
                tensors=tensors,
                mode="override",
                name=config.name,
                params=_manifest_params(config, slot, report),
                eval={"text": report},
            )
        )
    peak, kind = peak_memory(config.device)
    return HirmResult(made, reports, time.perf_counter() - started, peak, kind)


def _manifest_params(config: HirmConfig, slot: EncoderSlot, report: dict) -> dict[str, Any]:
    return {
        "variant": config.variant,
        "blocks": list(config.blocks),
        "layer": slot.layer,
        # As run: the measured step count and the width-scaled step size when not given.
        "steps": report["steps"],
        "lr": report["lr"],
        "scale": config.scale,
        "eta": config.eta if config.variant == "V" else None,
        "seed": config.seed,
        "templates": list(config.resolved_templates()),
        "synonyms": {c.name: list(c.synonyms) for c in config.concepts},
        "anchors": {c.name: c.anchor for c in config.concepts},
        "retain_prompts": len(config.retain_prompts),
        "retain_weight": config.resolved_retain_weight() if config.retain_prompts else None,
        **config.extra,
    }
