"""ESD training as a LoRA: the adapted denoiser learns to answer the concept's prompts with
the frozen base's negatively guided prediction.

    L = || eps_theta(x_t, c, t) - [eps0(x_t, "", t) - eta (eps0(x_t, c, t) - eps0(x_t, "", t))] ||^2

(eps is whatever the denoiser predicts: noise for U-Nets, velocity for Flux.) With retain
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

from erasure.esd.config import EsdConfig
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
        self.prompts = [p for c in config.concepts for p in expand(c, templates).prompts]
        probes = sorted({b for c in config.concepts for _, b in pairs(c, templates)})
        self.den = denoiser_for(pipe, config)
        self.cond = self.den.encode(self.prompts)
        self.probe = self.den.encode(probes)
        self.uncond = self.den.encode([""])
        retain = list(config.retain_prompts)
        self.retain = self.den.encode(retain) if retain else None
        self.unet = self.den.model
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
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

    def _target(self, latents, t, cond: Cond) -> torch.Tensor:
        out_c = self._base(latents, t, cond)
        out_u = self._base(latents, t, self.uncond.repeat(len(cond)))
        return out_u - self.config.eta * (out_c - out_u)

    def _preserve(self, latents, t) -> torch.Tensor:
        """The adapter's change of the prediction on a batch of retain prompts (MSE)."""
        pick = torch.randint(len(self.retain), (len(latents),), generator=self.generator)
        cond = self.retain.take(pick.to(self.retain.states.device))
        return F.mse_loss(self.den.predict(latents, t, cond), self._base(latents, t, cond))

    def run(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        c = self.config
        started = time.perf_counter()
        optimizer = torch.optim.Adam(self.trainable, lr=c.lr)
        first = last = kept = None
        bar = tqdm(range(c.steps), desc=f"ESD-{c.mode}", unit="step", disable=not c.progress)
        for _ in bar:
            pick = torch.randint(len(self.cond), (c.batch,), generator=self.generator)
            cond = self.cond.take(pick.to(self.cond.states.device))
            latents, t = self._sample_xt(cond)
            target = self._target(latents, t, cond)
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
        return report

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
            "lr": config.lr,
            "eta": config.eta,
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
            **config.extra,
        },
        eval={"unet": report},
    )
    peak, kind = peak_memory(config.device)
    return EsdResult(patch, report, time.perf_counter() - started, peak, kind)
