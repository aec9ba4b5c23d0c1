"""ErasePro's text-encoder chain: the MLP output projections (`mlp.fc2`) of chosen blocks,
edited one after another from shallow to deep.

For block i of the chain, X_i are the fc2 inputs at the target prompts' aligned tokens in the
encoder as edited so far, Y_i the fc2 inputs at the anchor prompts' aligned tokens in the
original encoder, and the edit solves W X_i = T_i exactly (erasure/closed_form.py). The
target T_i has two forms (`target`):
- "layer" (METHODS.md as written): T_i = W0_i Y_i, the layer's own output is the anchor's.
  Everything else the residual stream carries (the concept's token embedding, the attention
  sublayers' outputs) passes on unchanged, so later blocks still see the concept.
- "stream": T_i = W0_i Y_i + (S_a - S_t), S the residual stream the MLP's output is added to;
  the block's OUTPUT at each aligned token becomes the original anchor's. Where the
  constraint can be met, later blocks see anchor states at those tokens and need no change;
  what one block leaves (tokens it could not redirect, attention that still reads them) the
  next one removes, on inputs recomputed through the edited blocks, with a smaller change.
Then the next block's inputs are recomputed through the edited encoder. fc2's bias is kept:
it adds the same to both sides of the constraint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from erasure.closed_form import Gram, as_record, zero_residual
from erasure.erasepro.config import EraseProConfig
from erasure.text_readout import EncoderSlot, Layer, read_states, read_states_batched
from erasure.token_pairs import TokenPairs
from patches.errors import WrongTarget
from patches.targets import find_block_list

BATCH = 128


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


class _Taps:
    """Forward hooks on chosen blocks: fc2's input and the stream fc2's output is added to."""

    def __init__(self, encoder: torch.nn.Module, blocks: Sequence[int]):
        _, block_list = find_block_list(encoder)
        self.seen: dict[int, dict[str, torch.Tensor]] = {}
        self.handles = []
        for index in blocks:
            slot = self.seen.setdefault(index, {})
            block = block_list[index]

            def on_fc2(module, args, out, slot=slot):
                slot["input"], slot["fc2"] = args[0].detach(), out.detach()

            def on_block(module, args, out, slot=slot):
                slot["stream"] = _output(out).detach() - slot["fc2"]
                slot["output"] = _output(out).detach()

            self.handles.append(block.mlp.fc2.register_forward_hook(on_fc2))
            self.handles.append(block.register_forward_hook(on_block))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class Captured:
    """One pass over a prompt set: per block, fc2's inputs, the stream before fc2's add and
    the block's output, [B, L, d]; and, when asked, the states the denoiser reads."""

    blocks: dict[int, dict[str, torch.Tensor]]
    states: torch.Tensor | None = None


@torch.no_grad()
def capture(
    encoder: torch.nn.Module,
    ids: torch.Tensor,
    blocks: Sequence[int],
    sink: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    readout: Layer | None = None,
) -> Captured:
    """The block taps of one pass over `ids` (with `sink`, each batch's taps go to
    sink(block, taps) instead and none are kept); with `readout`, the same pass also keeps
    the states the denoiser reads, so the report needs no pass of its own."""
    taps = _Taps(encoder, blocks)
    kept: dict[int, dict[str, list[torch.Tensor]]] = {b: {} for b in blocks}
    states: list[torch.Tensor] = []
    try:
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH]
            if readout is None:
                encoder(batch)
            else:
                states.append(read_states(encoder, batch, readout))
            for block, seen in taps.seen.items():
                if sink is not None:
                    sink(block, seen)
                else:
                    for key, value in seen.items():
                        kept[block].setdefault(key, []).append(value)
    finally:
        taps.close()
    return Captured(
        {b: {k: torch.cat(v) for k, v in parts.items()} for b, parts in kept.items()},
        torch.cat(states) if states else None,
    )


def _gap(pairs: TokenPairs, target: torch.Tensor, anchor: torch.Tensor) -> float:
    """Relative distance of the target's aligned token vectors from the anchor's."""
    x, y = pairs.gather(target, anchor)
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def run_chain(
    base: torch.nn.Module,
    slot: EncoderSlot,
    pairs: TokenPairs,
    retain_ids: torch.Tensor,
    config: EraseProConfig,
    check_ids: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """Edit `base`'s chain progressively (on a float32 copy); returns the weight deltas by
    parameter name (float32, on the CPU), a report per layer, and the readout figures
    (with `check_ids`, the held-out check prompts' drift too)."""
    original = copy.deepcopy(base).float().eval()
    work = copy.deepcopy(original)
    list_name, block_list = find_block_list(work)
    blocks = sorted(set(config.blocks))
    if blocks[0] < 0 or blocks[-1] >= len(block_list):
        raise WrongTarget(
            f"the text chain names blocks {blocks}; {slot.component} has blocks "
            f"0..{len(block_list) - 1}"
        )
    device = next(work.parameters()).device
    pairs = pairs.to(device)
    retain_ids = retain_ids.to(device)
    check_ids = None if check_ids is None else check_ids.to(device)
    # The report's readout states come from the passes the edit makes anyway: the anchors'
    # and the retain prompts' on the original encoder, the target's before the first edit
    # and after the last.
    anchor_pass = capture(original, pairs.anchor_ids, blocks, readout=slot.layer)
    anchors = anchor_pass.blocks
    # The retain prompts' inputs as the original encoder makes them: where they should stay,
    # and one pass for every block (the retain set is often the largest prompt set).
    grams: dict[int, Gram] = {}
    retain_pass = capture(
        original,
        retain_ids,
        blocks,
        lambda b, seen: grams.setdefault(b, Gram(seen["input"].shape[-1])).add(seen["input"]),
        readout=slot.layer,
    )
    deltas, layers = {}, []
    target_before = None
    for step, index in enumerate(blocks):
        fc2 = block_list[index].mlp.fc2
        w0 = fc2.weight.detach().double().cpu()
        # One pass through the encoder as edited so far: this block's inputs, and the block
        # edited last, to report how close its outputs came to the anchor's.
        first = capture(
            work,
            pairs.target_ids,
            blocks[max(step - 1, 0) : step + 1],
            readout=slot.layer if step == 0 else None,
        )
        seen = first.blocks
        if step == 0:
            target_before = first.states  # nothing edited yet: the original's
        if step:
            layers[-1]["stream_gap_after"] = _gap(
                pairs, seen[blocks[step - 1]]["output"], anchors[blocks[step - 1]]["output"]
            )
        mine, theirs = seen[index], anchors[index]
        x, y = pairs.gather(mine["input"], theirs["input"])
        target = w0 @ y.double().cpu()
        if config.target == "stream":
            s_t, s_a = pairs.gather(mine["stream"], theirs["stream"])
            target = target + (s_a - s_t).double().cpu()
        solve = zero_residual(
            w0, x.cpu(), target, grams[index], config.preserve_weight, config.rcond
        )
        with torch.no_grad():
            fc2.weight += solve.delta.to(device)
        name = f"{list_name}.{index}.mlp.fc2.weight"
        deltas[name] = solve.delta
        layers.append(
            {
                "component": slot.component,
                "layer": name,
                "block": index,
                **as_record(solve),
                "delta_relative": solve.norm / float(w0.norm()),
                "stream_gap_before": _gap(pairs, mine["output"], theirs["output"]),
            }
        )
    last_pass = capture(work, pairs.target_ids, blocks[-1:], readout=slot.layer)
    last = last_pass.blocks[blocks[-1]]
    layers[-1]["stream_gap_after"] = _gap(pairs, last["output"], anchors[blocks[-1]]["output"])
    readout = _readout(
        Readout(anchor_pass.states, target_before, last_pass.states, retain_pass.states),
        original,
        work,
        slot,
        pairs,
        retain_ids,
        check_ids,
    )
    return deltas, layers, readout


def _per_prompt_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per prompt, the mean relative change of its token states."""
    return ((new - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-8)).mean(1)


@dataclass
class Readout:
    """Readout states the chain's own passes produced (original encoder unless noted)."""

    anchor: torch.Tensor
    target_before: torch.Tensor
    target_after: torch.Tensor  # the edited encoder's
    retain: torch.Tensor


@torch.no_grad()
def _readout(
    seen: Readout, original, work, slot: EncoderSlot, pairs: TokenPairs, retain_ids, check_ids
) -> dict[str, Any]:
    """What the denoiser will read: how far the target's aligned tokens still are from the
    anchor's, how far the concept's prompts and the retain prompts moved (relative norms),
    and per check prompt how far it moved."""

    def states(encoder, ids):
        return read_states_batched(encoder, ids, slot.layer, BATCH)

    anchor, kept = seen.anchor, seen.retain
    target_before, target_after = seen.target_before, seen.target_after
    out = {
        "component": slot.component,
        "readout": slot.layer,
        "readout_gap_before": _gap(pairs, target_before, anchor),
        "readout_gap_after": _gap(pairs, target_after, anchor),
        "retain_drift": float((states(work, retain_ids) - kept).norm() / kept.norm()),
        # Positions 1..: the start token is the same in every prompt.
        "concept_shift": float(
            _per_prompt_change(target_after[:, 1:], target_before[:, 1:]).mean()
        ),
    }
    if check_ids is not None:
        out["check_drift"] = _per_prompt_change(
            states(work, check_ids), states(original, check_ids)
        ).tolist()
    return out
