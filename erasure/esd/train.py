"""ESD training as a LoRA: the adapted denoiser learns to answer the concept's prompts with
the frozen base's negatively guided prediction.

    L = || eps_theta(x_t, c, t) - [eps0(x_t, r, t) - eta (eps0(x_t, c, t) - eps0(x_t, r, t))] ||^2

(eps is whatever the denoiser predicts: noise for U-Nets, velocity for Flux.) The reference
r is the empty prompt in the published ESD (eta 1). With an anchor it is the same prompt with
the concept replaced by the anchor ("a star in stripes style" -> "a pattern in stripes
style") and eta defaults to 0, so the target is the anchored prompt's own prediction: the
published target pushes away from everything the prompt says, its style included, and
turned most of MiniCanvas's star cells into black frames; pushing past the anchor (eta 1)
still broke gradient cells (docs/ERASURE.md). With retain
prompts q (beyond the published method) a preservation term keeps the base's answer there:

    + w || eps_theta(x_t, q, t) - eps0(x_t, q, t) ||^2      (same x_t, a batch of q per step)

x_t comes from
the current (adapted) model: a trajectory from noise under the concept's prompt, stopped
after a random number of steps (erasure/esd/denoisers.py has each family's). The base
prediction is the same denoiser with the adapter switched off, so one copy is held. The
pipeline's own denoiser is never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from erasure.esd.config import LR_TIMES_WIDTH, EsdConfig
from erasure.esd.denoisers import ADAPTER, Cond, denoiser_for
from erasure.measure import peak_memory, reset_peak_memory
from erasure.prompts import expand, pairs
from patches.patch import Patch


@dataclass
class EsdResult:
    patch: Patch
    report: dict[str, Any]
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str


class _Trainer:
    def __init__(self, pipe: Any, config: EsdConfig):
        self.config = config
        templates = config.resolved_templates()
        sets = [expand(c, templates) for c in config.concepts]
        self.prompts = [p for s in sets for p in s.prompts]
        # Each prompt's reference: its anchored twin, or the empty prompt without an anchor.
        references = [r for s in sets for r in (s.anchored or ("",) * len(s.prompts))]
        probes = sorted({b for c in config.concepts for _, b in pairs(c, templates)})
        self.den = denoiser_for(pipe, config)
        self.cond = self.den.encode(self.prompts)
        self.reference = self.den.encode(references)
        self.probe = self.den.encode(probes)
        self.uncond = self.den.encode([""])
        retain = list(config.retain_prompts)
        self.retain = self.den.encode(retain) if retain else None
        self.unet = self.den.model
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.check = self.den.encode(list(config.check_prompts)) if config.check_prompts else None
        # Input width of each adapted layer (Linear or 1x1 Conv2d: the weight's dim 1).
        widths = [
            m.weight.shape[1]
            for n, m in self.unet.named_modules()
            if n.endswith(f"lora_A.{ADAPTER}")
        ]
        width = sum(widths) / len(widths)
        self.lr = config.lr if config.lr is not None else LR_TIMES_WIDTH / width
        self.generator = torch.Generator().manual_seed(config.seed)

    def _sample_xt(self, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t from the current model's trajectory, stopped at a random step, and its t."""
        c = self.config
        low = int(c.t_range[0] * c.sample_steps)
        high = max(int(c.t_range[1] * c.sample_steps), low + 1)
        stop = int(torch.randint(low, high, (1,), generator=self.generator))
        return self.den.trajectory(cond, self.uncond.repeat(len(cond)), stop, self.generator)

    @torch.no_grad()
    def _base(self, latents, t, cond: Cond) -> torch.Tensor:
        self.unet.disable_adapters()
        try:
            return self.den.predict(latents, t, cond)
        finally:
            self.unet.enable_adapters()

    def _target(self, latents, t, cond: Cond, reference: Cond) -> torch.Tensor:
        out_c = self._base(latents, t, cond)
        out_r = self._base(latents, t, reference)
        return out_r - self.config.resolved_eta() * (out_c - out_r)

    def _preserve(self, latents, t) -> torch.Tensor:
        """The adapter's change of the prediction on a batch of retain prompts (MSE)."""
        pick = torch.randint(len(self.retain), (len(latents),), generator=self.generator)
        cond = self.retain.take(pick.to(self.retain.states.device))
        return F.mse_loss(self.den.predict(latents, t, cond), self._base(latents, t, cond))

    def run(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        c = self.config
        started = time.perf_counter()
        optimizer = torch.optim.Adam(self.trainable, lr=self.lr)
        first = last = kept = None
        bar = tqdm(range(c.steps), desc=f"ESD-{c.mode}", unit="step", disable=not c.progress)
        for _ in bar:
            pick = torch.randint(len(self.cond), (c.batch,), generator=self.generator)
            pick = pick.to(self.cond.states.device)
            cond = self.cond.take(pick)
            latents, t = self._sample_xt(cond)
            target = self._target(latents, t, cond, self.reference.take(pick))
            loss = F.mse_loss(self.den.predict(latents, t, cond), target)
            last = loss.item()
            if self.retain is not None:
                preserve = self._preserve(latents, t)
                kept = preserve.item()
                loss = loss + c.retain_weight * preserve
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first = last if first is None else first
            shown = {"loss": f"{last:.4f}"} | ({} if kept is None else {"retain": f"{kept:.5f}"})
            bar.set_postfix(shown, refresh=False)
        report = self._report()
        report.update(
            mode=c.mode,
            adapted_modules=sum(1 for n, _ in self.unet.named_modules() if n.endswith(".lora_A")),
            trained_parameters=sum(p.numel() for p in self.trainable),
            prompts=len(self.prompts),
            loss_first=round(first, 6),
            loss_last=round(last, 6),
            retain_loss_last=None if kept is None else round(kept, 8),
            lr=self.lr,
            seconds=round(time.perf_counter() - started, 3),
        )
        return self._tensors(), report

    @torch.no_grad()
    def _report(self) -> dict[str, Any]:
        """How far the adapter moves noise predictions: concept prompts vs concept-free ones."""
        mid = self.den.timesteps[len(self.den.timesteps) // 2]
        probe_generator = torch.Generator().manual_seed(self.config.seed + 1)

        def shift(states: Cond) -> float:
            x = self.den.noise(len(states), probe_generator)
            adapted = self.den.predict(x, mid, states)
            base = self._base(x, mid, states)
            return float((adapted - base).norm() / base.norm())

        report = {
            "concept_eps_shift": round(shift(self.cond), 6),
            "retain_eps_drift": round(shift(self.probe), 6),
            "retain_drift_on": "concept-free twins of the training prompts",
        }
        if self.retain is not None:
            sample = torch.arange(min(len(self.retain), 64), device=self.retain.states.device)
            report["retain_set_eps_drift"] = round(shift(self.retain.take(sample)), 6)
        if self.check is not None:
            report["check_drift"] = self._check_drift(mid, probe_generator)
        return report

    @torch.no_grad()
    def _check_drift(self, t, generator: torch.Generator, batch: int = 64) -> dict[str, float]:
        """Per held-out check prompt: the relative shift of its prediction (one noise draw)."""
        out: dict[str, float] = {}
        prompts = self.config.check_prompts
        device = self.check.states.device
        for start in range(0, len(prompts), batch):
            index = torch.arange(start, min(start + batch, len(prompts)), device=device)
            states = self.check.take(index)
            x = self.den.noise(len(states), generator)
            adapted = self.den.predict(x, t, states)
            base = self._base(x, t, states)
            shift = (adapted - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
            for i, value in zip(index.tolist(), shift.tolist(), strict=True):
                out[prompts[i]] = round(value, 6)
        return out

    def _tensors(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
        prefix = self.den.component
        return {
            f"{prefix}.{k}": v.detach().to("cpu", torch.float32).contiguous()
            for k, v in state.items()
        }


def erase_esd(pipe: Any, config: EsdConfig) -> EsdResult:
    """Train an ESD LoRA for `config.concepts` on `pipe`'s U-Net; returns a unet_lora patch."""
    config.check()
    torch.manual_seed(config.seed)
    reset_peak_memory(config.device)
    started = time.perf_counter()
    trainer = _Trainer(pipe, config)
    tensors, report = trainer.run()
    patch = Patch.create(
        pipe=pipe,
        kind="unet_lora",
        component=trainer.den.component,
        method=f"esd-{config.mode}",
        concepts=[c.name for c in config.concepts],
        tensors=tensors,
        name=config.name,
        params={
            "mode": config.mode,
            "rank": config.rank,
            "steps": config.steps,
            "lr": report["lr"],
            "eta": config.resolved_eta(),
            "batch": config.batch,
            "sample_steps": config.sample_steps,
            "sample_guidance": config.sample_guidance,
            "resolution": config.resolution,
            "t_range": list(config.t_range),
            "retain_prompts": len(config.retain_prompts),
            "retain_weight": config.retain_weight if config.retain_prompts else None,
            "seed": config.seed,
            "templates": list(config.resolved_templates()),
            "synonyms": {c.name: list(c.synonyms) for c in config.concepts},
            "anchors": {c.name: c.anchor for c in config.concepts},
            **config.extra,
        },
        eval={"unet": report},
    )
    peak, kind = peak_memory(config.device)
    return EsdResult(patch, report, time.perf_counter() - started, peak, kind)
