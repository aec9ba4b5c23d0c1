"""DuMo training: an eraser on the frozen U-Net's skip connections (patches/skip_eraser.py).

The published code is inference-only; this is ConceptGuard's training, built from the
method's description (../shared/docs/METHODS.md):

1. The prompt gate is calibrated before training: its target holds the token states the
   text encoder gives the concept's words (and synonyms) inside the training prompts, its
   contrast the retain prompts' token states; the gate opens fully above the lowest score
   of a concept prompt and closes below the highest of a retain prompt (each scored without
   its own states). The gate is part of the model while it trains.
2. The eraser (phase 1) learns, with the U-Net frozen, to move the concept's predictions to
   the frozen U-Net's guidance away from the concept, relative to each prompt's anchored
   twin r ("a star in stripes style" -> "a pattern in stripes style"):
       L = || eps(x_t, c) - [eps0(x_t, r) - eta (eps0(x_t, c) - eps0(x_t, r))] ||^2
         + w || eps(x_t, q) - eps0(x_t, q) ||^2       (retain prompts q, same x_t)
   x_t comes from the current model's trajectory under the concept's prompt, stopped at a
   random step (ESD's sampler, erasure/esd/denoisers.py); with `anchor_share` > 0 that
   share of each batch comes from its anchored twin's trajectory instead.
3. TLMO (phase 2): the eraser frozen, the table scale[timestep bucket][output] (from 1)
   learns the same loss with the retain side on held-out prompts, so each output keeps only
   the strength erasure needs at each time.

Phases can be interrupted and resumed (`checkpoint`: the eraser, Adam's moments and the
random state in a safetensors file, the step in JSON). The pipeline is never touched: the
U-Net trained against is a float32 copy.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm import tqdm

from erasure.dumo.config import DumoConfig
from erasure.esd.denoisers import Cond, denoiser_for
from erasure.measure import peak_memory, reset_peak_memory
from erasure.prompts import expand
from patches.atomic import atomic_write_json
from patches.errors import WrongTarget
from patches.patch import Patch
from patches.skip_eraser import NAME, SkipEraser, gate_score, initialised_from
from patches.targets import pipeline_family


@dataclass
class DumoResult:
    patch: Patch
    report: dict[str, Any]
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str


def _token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """`prompt`'s token ids as the text encoder sees them: start and end tokens, truncated
    to the encoder's length, no padding."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def _thinned(
    states: torch.Tensor, rows: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`states` and the prompt row each came from, evenly thinned to at most `count`."""
    pick = torch.linspace(0, len(states) - 1, min(count, len(states))).round().long()
    return states[pick].clone(), rows[pick]


def _concept_positions(tokenizer: Any, prompt: str, words: tuple[str, ...]) -> list[int]:
    """Token positions (in the padded sequence) of any of `words` inside `prompt`."""
    ids = _token_ids(tokenizer, prompt)
    found = []
    for word in words:
        target = tokenizer(word, add_special_tokens=False).input_ids
        for start in range(1, len(ids) - len(target) + 1):
            if ids[start : start + len(target)] == target:
                found.extend(range(start, start + len(target)))
    return sorted(set(found))


class _Trainer:
    def __init__(self, pipe: Any, config: DumoConfig):
        if pipeline_family(pipe) == "flux":
            raise WrongTarget(
                "DuMo adds to a U-Net's skip connections; Flux's transformer has none (use "
                "ESD or a text-encoder method on Flux)"
            )
        self.config = config
        self.pipe = pipe
        templates = config.resolved_templates()
        sets = [expand(c, templates) for c in config.concepts]
        self.prompts = [p for s in sets for p in s.prompts]
        self.words = [w for c in config.concepts for w in c.words]
        references = [r for s in sets for r in s.anchored]
        self.unet = copy.deepcopy(pipe.unet).float().to(config.device).requires_grad_(False)
        module_config = {
            "width": config.width,
            "buckets": config.buckets,
            "train_timesteps": int(pipe.scheduler.config.num_train_timesteps),
            "gate_tokens": config.gate_tokens,
        }
        eraser = SkipEraser(dict(self.unet.config), module_config)
        self.eraser = initialised_from(self.unet, eraser)
        if not config.prior:
            self._reinitialise_encoder()
        self.module_config = module_config
        self.active = True
        self.unet.register_forward_pre_hook(self._add_residuals, with_kwargs=True)
        self.den = denoiser_for(pipe, config, model=self.unet)
        self.cond = self.den.encode(self.prompts)
        self.reference = self.den.encode(references)
        self.uncond = self.den.encode([""])
        retain = list(config.retain_prompts)
        self.retain = self.den.encode(retain) if retain else None
        checks = list(config.check_prompts)
        self.check = self.den.encode(checks) if checks else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.gate_report = self._calibrate_gate() if config.gate else {"gate": "off"}

    def _reinitialise_encoder(self) -> None:
        """The ablation of DuMo's prior knowledge: the encoder from a fresh random init."""
        fresh = type(self.unet).from_config(self.unet.config)
        state = {}
        for name, value in self.eraser.state_dict().items():
            if name.split(".", 1)[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                full = fresh.state_dict()[name]
                state[name] = full[tuple(slice(0, n) for n in value.shape)].to(value)
        self.eraser.load_state_dict(state, strict=False)

    def _add_residuals(self, module, args, kwargs):
        from patches.unet_modules import call_inputs, with_residuals

        if not self.active:
            return args, kwargs
        out = self.eraser(*call_inputs(args, kwargs))
        return args, with_residuals(kwargs, out.down, out.mid)

    # --- the gate -----------------------------------------------------------------------

    def _calibrate_gate(self) -> dict[str, Any]:
        """The gate's target (the concept words' token states, evenly sampled) and its
        range: open above the lowest similarity of a concept prompt to the target vectors
        taken from the OTHER prompts (an honest estimate for prompts never seen), closed
        below the highest of the empty prompt and the retain and check prompts."""
        tokenizer = self.pipe.tokenizer
        vectors, origin = [], []
        for row, prompt in enumerate(self.prompts):
            for position in _concept_positions(tokenizer, prompt, tuple(self.words)):
                vectors.append(self.cond.states[row, position])
                origin.append(row)
        if not vectors:
            raise WrongTarget("the concept's words do not appear in its prompts' tokens")
        # The state at a concept word depends on the words before it (causal attention), so
        # the gate keeps many contexts: every occurrence, evenly thinned to `gate_tokens`.
        target, source = _thinned(
            torch.stack(vectors), torch.tensor(origin), self.config.gate_tokens
        )
        self.eraser.gate_target = torch.nn.Parameter(target, requires_grad=False)
        self.module_config["gate_tokens"] = len(target)
        contrast, contrast_source = self._gate_contrast()
        unseen = []
        for row in range(len(self.prompts)):
            others = target[source != row]
            if len(others):
                unseen.append(gate_score(self.cond.states[row : row + 1], others, contrast))
        concept = torch.cat(unseen)
        scores = [gate_score(self.uncond.states, target, contrast)]
        if self.retain is not None:
            # A retain prompt is scored without its own states in the contrast: what a
            # prompt the patch never saw would get.
            scores += [
                gate_score(
                    self.retain.states[row : row + 1],
                    target,
                    None if contrast is None else contrast[contrast_source != row],
                )
                for row in range(len(self.retain.states))
            ]
        if self.check is not None:
            scores.append(gate_score(self.check.states, target, contrast))
        other = torch.cat(scores)
        high, low = float(concept.min()), float(other.max())
        separable = high > low
        if not separable:
            # The sets overlap: open the gate over the middle of the overlap (reported).
            middle = (high + low) / 2
            low, high = middle - 0.01, middle + 0.01
        self.eraser.gate_range = (low, high)
        self.module_config["gate"] = {"low": low, "high": high}
        return {
            "gate": "on",
            "contrast_tokens": 0 if contrast is None else len(contrast),
            "low": round(low, 6),
            "high": round(high, 6),
            "concept_similarity_min": round(float(concept.min()), 6),
            "other_similarity_max": round(float(other.max()), 6),
            "separable": separable,
        }

    def _gate_contrast(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The retain prompts' states at every position the gate reads, and the retain row
        each came from; set as the eraser's contrast. Two pools, each evenly thinned to
        `gate_contrast_tokens`: the tokens (start token excluded, end token included) and
        the padding after the end token. None without retain prompts or with the option
        at 0.

        The padding matters: the gate takes its maximum over every position, and a padding
        state sums up the whole prompt. With tokens alone in the contrast, on MiniCanvas "a
        plain cross" scored 0.41 against dots' eraser at a padding position, above "a
        crescent in dots style" (0.34): the gate could not separate the two and stayed shut
        on crescent's dots cells."""
        count = self.config.gate_contrast_tokens
        if not count or self.retain is None:
            return None, torch.empty(0, dtype=torch.long)
        tokenizer = self.pipe.tokenizer
        positions = self.retain.states.shape[1]
        pools: tuple[list, list] = ([], [])  # (tokens, padding): (states, rows) per prompt
        for row, prompt in enumerate(self.config.retain_prompts):
            length = min(len(_token_ids(tokenizer, prompt)), positions)
            spans = (slice(1, length), slice(length, positions))
            for pool, span in zip(pools, spans, strict=True):
                states = self.retain.states[row, span]
                pool.append((states, torch.full((len(states),), row)))
        picked = [
            _thinned(torch.cat([s for s, _ in pool]), torch.cat([r for _, r in pool]), count)
            for pool in pools
        ]
        contrast = torch.cat([states for states, _ in picked])
        source = torch.cat([rows for _, rows in picked])
        self.eraser.gate_contrast = torch.nn.Parameter(contrast, requires_grad=False)
        self.module_config["gate_contrast_tokens"] = len(contrast)
        return contrast, source

    # --- losses -------------------------------------------------------------------------

    def _stop(self, phase: str, step: int) -> int:
        """The sampler step x_t is drawn at. The eraser draws it at random. TLMO learns one
        table row per timestep bucket, each only from the steps drawn in it: 60 random
        draws out of 25 left bucket 13 (t = 679) at its initial 1.0 in every MiniCanvas
        patch. So TLMO walks shuffled cycles through all steps; the order comes from the
        seed and the cycle's number, so a resumed run draws the same."""
        c = self.config
        low = int(c.t_range[0] * c.sample_steps)
        high = max(int(c.t_range[1] * c.sample_steps), low + 1)
        if phase != "tlmo":
            return int(torch.randint(low, high, (1,), generator=self.generator))
        cycle, position = divmod(step, high - low)
        order = torch.Generator().manual_seed(c.seed * 100_003 + cycle)
        return low + int(torch.randperm(high - low, generator=order)[position])

    def _sample_xt(self, cond: Cond, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.den.trajectory(cond, self.uncond.repeat(len(cond)), stop, self.generator)

    @torch.no_grad()
    def _base(self, latents, t, cond: Cond) -> torch.Tensor:
        self.active = False
        try:
            return self.den.predict(latents, t, cond)
        finally:
            self.active = True

    def _loss(
        self, retain: Cond | None, phase: str, step: int
    ) -> tuple[torch.Tensor, float, float | None]:
        c = self.config
        pick = torch.randint(len(self.cond), (c.batch,), generator=self.generator)
        cond = self.cond.take(pick)
        anchored = round(c.anchor_share * c.batch)
        path = cond
        if anchored:
            rest = torch.arange(anchored, c.batch)
            path = self.reference.take(pick[:anchored]).cat(cond.take(rest))
        latents, t = self._sample_xt(path, self._stop(phase, step))
        reference = self._base(latents, t, self.reference.take(pick))
        target = reference - c.eta * (self._base(latents, t, cond) - reference)
        loss = F.mse_loss(self.den.predict(latents, t, cond), target)
        erase = loss.item()
        kept = None
        if retain is not None and c.retain_weight > 0:
            rows = torch.randint(len(retain), (c.batch,), generator=self.generator)
            keep = retain.take(rows)
            preserve = F.mse_loss(self.den.predict(latents, t, keep), self._base(latents, t, keep))
            kept = preserve.item()
            loss = loss + c.retain_weight * preserve
        return loss, erase, kept

    # --- phases -------------------------------------------------------------------------

    def _phase(self, name: str, params, steps: int, lr: float, retain) -> dict[str, Any]:
        optimizer = torch.optim.Adam(params, lr=lr)
        start = self._resume(name, optimizer)
        curve: list[tuple[int, float, float | None]] = []
        bar = tqdm(
            range(start, steps),
            desc=f"DuMo {name}",
            unit="step",
            disable=not self.config.progress,
            initial=start,
            total=steps,
        )
        for step in bar:
            loss, erase, kept = self._loss(retain, name, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if name == "tlmo":
                with torch.no_grad():
                    self.eraser.tlmo.clamp_(min=0.0)
            curve.append((step, erase, kept))
            shown = {"loss": f"{erase:.4f}"} | ({} if kept is None else {"keep": f"{kept:.5f}"})
            bar.set_postfix(shown, refresh=False)
            if self.config.checkpoint and (step + 1) % self.config.checkpoint_every == 0:
                self._save(name, step + 1, optimizer)
        return {
            "steps": steps,
            "loss_curve": [
                {"step": s, "erase": round(e, 6), "retain": None if k is None else round(k, 8)}
                for s, e, k in curve[:: max(1, len(curve) // 20)]
            ],
            "loss_last": round(curve[-1][1], 6) if curve else None,
        }

    def run(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        c = self.config
        started = time.perf_counter()
        fixed = ("tlmo", "gate_target", "gate_contrast")
        trainable = [p for n, p in self.eraser.named_parameters() if n not in fixed]
        for p in trainable:
            p.requires_grad_(True)
        report: dict[str, Any] = {
            "eraser": self._phase("eraser", trainable, c.steps, c.lr, self.retain)
        }
        for p in trainable:
            p.requires_grad_(False)
        if c.tlmo and c.tlmo_steps:
            tlmo = self.eraser.tlmo.requires_grad_(True)
            held_out = self.check or self.retain
            report["tlmo"] = self._phase("tlmo", [tlmo], c.tlmo_steps, c.tlmo_lr, held_out)
            tlmo.requires_grad_(False)
            report["tlmo"]["table"] = [[round(v, 4) for v in row] for row in tlmo.tolist()]
        report.update(self._drift(), gate=self.gate_report)
        report["seconds"] = round(time.perf_counter() - started, 3)
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.eraser.state_tensors().items()
        }
        report["module_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        report["prompts"] = len(self.prompts)
        return tensors, report

    @torch.no_grad()
    def _drift(self) -> dict[str, Any]:
        """How far the eraser moves noise predictions: concept prompts vs held-out ones."""
        mid = self.den.timesteps[len(self.den.timesteps) // 2]
        generator = torch.Generator().manual_seed(self.config.seed + 1)

        def shift(states: Cond, limit: int) -> float:
            states = states.take(torch.arange(min(len(states), limit)))
            x = self.den.noise(len(states), generator)
            base = self._base(x, mid, states)
            return float((self.den.predict(x, mid, states) - base).norm() / base.norm())

        out = {"concept_eps_shift": round(shift(self.cond, 32), 6)}
        if self.check is not None:
            out["check_eps_drift"] = round(shift(self.check, 64), 6)
        return out

    # --- resuming -----------------------------------------------------------------------

    def _paths(self) -> tuple[Path, Path]:
        base = Path(self.config.checkpoint)
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def _save(self, phase: str, step: int, optimizer: torch.optim.Optimizer) -> None:
        tensors_path, meta_path = self._paths()
        tensors = {
            f"eraser.{k}": v.detach().cpu().contiguous()
            for k, v in self.eraser.state_dict().items()
        }
        for i, state in enumerate(optimizer.state.values()):
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"adam.{i}.{key}"] = state[key].detach().cpu().contiguous()
        tensors["rng"] = self.generator.get_state()
        save_file(tensors, str(tensors_path) + ".tmp")
        Path(str(tensors_path) + ".tmp").replace(tensors_path)
        adam_steps = [int(s["step"]) for s in optimizer.state.values()]
        meta = {"phase": phase, "step": step, "adam_steps": adam_steps}
        atomic_write_json(meta_path, meta)

    def _resume(self, phase: str, optimizer: torch.optim.Optimizer) -> int:
        if not self.config.checkpoint:
            return 0
        tensors_path, meta_path = self._paths()
        if not meta_path.exists():
            return 0
        meta = json.loads(meta_path.read_text())
        done = ["eraser", "tlmo"]
        if done.index(meta["phase"]) < done.index(phase):
            return 0
        tensors = load_file(str(tensors_path))
        state = {k[len("eraser.") :]: v for k, v in tensors.items() if k.startswith("eraser.")}
        self.eraser.load_state_dict(state, strict=True)
        if meta["phase"] != phase:
            return 0
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, (param, steps) in enumerate(zip(params, meta["adam_steps"], strict=False)):
            optimizer.state[param] = {
                "step": torch.tensor(float(steps)),
                "exp_avg": tensors[f"adam.{i}.exp_avg"].to(param),
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(param),
            }
        self.generator.set_state(tensors["rng"])
        return int(meta["step"])


def erase_dumo(pipe: Any, config: DumoConfig) -> DumoResult:
    """Train a DuMo eraser for `config.concepts` on `pipe`'s U-Net; a unet_module patch."""
    config.check()
    torch.manual_seed(config.seed)
    reset_peak_memory(config.device)
    started = time.perf_counter()
    trainer = _Trainer(pipe, config)
    tensors, report = trainer.run()
    patch = Patch.create(
        pipe=pipe,
        kind="unet_module",
        component="unet",
        method="dumo",
        concepts=[c.name for c in config.concepts],
        tensors=tensors,
        name=config.name,
        params={
            "module_type": NAME,
            "module_config": trainer.module_config,
            "steps": config.steps,
            "lr": config.lr,
            "eta": config.eta,
            "batch": config.batch,
            "anchor_share": config.anchor_share,
            "tlmo_steps": config.tlmo_steps if config.tlmo else 0,
            "prior": config.prior,
            "retain_prompts": len(config.retain_prompts),
            "retain_weight": config.retain_weight,
            "seed": config.seed,
            "templates": list(config.resolved_templates()),
            "synonyms": {c.name: list(c.synonyms) for c in config.concepts},
            "anchors": {c.name: c.anchor for c in config.concepts},
            **config.extra,
        },
        eval={"unet": report},
    )
    peak, kind = peak_memory(config.device)
    return DumoResult(patch, report, time.perf_counter() - started, peak, kind)
