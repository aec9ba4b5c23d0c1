"""ESD training as a LoRA: the adapted U-Net learns to answer the concept's prompts with the
frozen base's negatively guided prediction.

    L = || eps_theta(x_t, c, t) - [eps0(x_t, "", t) - eta (eps0(x_t, c, t) - eps0(x_t, "", t))] ||^2

x_t comes from the current (adapted) model: a DDIM trajectory from noise, guided by the
concept's prompt, stopped after a random number of steps. The base prediction eps0 is the
same U-Net with the adapter switched off, so only one copy of the U-Net is held. The
pipeline's own U-Net is never touched.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from erasure.esd.config import TARGET_MODULES, EsdConfig
from erasure.measure import peak_memory, reset_peak_memory
from erasure.prompts import expand, pairs
from patches.errors import WrongTarget
from patches.patch import Patch
from patches.targets import pipeline_family

ADAPTER = "esd"


@dataclass
class EsdResult:
    patch: Patch
    report: dict[str, Any]
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str


@dataclass
class _Cond:
    """A batch of U-Net conditioning: token states, and SDXL's pooled embedding + time ids."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # [1, 6], the same for every row

    def __len__(self) -> int:
        return len(self.states)

    def take(self, index: torch.Tensor) -> _Cond:
        pooled = None if self.pooled is None else self.pooled[index]
        return _Cond(self.states[index], pooled, self.time_ids)

    def repeat(self, count: int) -> _Cond:
        return self.take(torch.zeros(count, dtype=torch.long, device=self.states.device))

    def cat(self, other: _Cond) -> _Cond:
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return _Cond(torch.cat([self.states, other.states]), pooled, self.time_ids)

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.states}
        if self.pooled is not None:
            time_ids = self.time_ids.expand(len(self), -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": time_ids}
        return kwargs


@torch.no_grad()
def _encode(pipe: Any, prompts: list[str], device: str) -> _Cond:
    """What the family's pipeline feeds its U-Net for `prompts` (its own encode_prompt)."""
    on = pipe.text_encoder.device
    if pipeline_family(pipe) == "sdxl":
        states, _, pooled, _ = pipe.encode_prompt(
            prompts, device=on, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids(
            (size, size),
            (0, 0),
            (size, size),
            dtype=torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        return _Cond(states.float().to(device), pooled.float().to(device), time_ids.to(device))
    states, _ = pipe.encode_prompt(prompts, on, 1, False)
    return _Cond(states.float().to(device))


def _lora_unet(pipe: Any, config: EsdConfig) -> torch.nn.Module:
    from peft import LoraConfig

    unet = copy.deepcopy(pipe.unet).float().to(config.device)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.rank,  # scale 1: nothing to fold into lora_B
            target_modules=TARGET_MODULES[config.mode],
            init_lora_weights=True,  # lora_B = 0: training starts at the base
        ),
        adapter_name=ADAPTER,
    )
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)
    return unet


class _Trainer:
    def __init__(self, pipe: Any, config: EsdConfig):
        self.config = config
        device = config.device
        templates = config.resolved_templates()
        self.prompts = [p for c in config.concepts for p in expand(c, templates).prompts]
        probes = sorted({b for c in config.concepts for _, b in pairs(c, templates)})
        self.cond = _encode(pipe, self.prompts, device)
        self.probe = _encode(pipe, probes, device)
        self.uncond = _encode(pipe, [""], device)
        self.unet = _lora_unet(pipe, config)
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(config.sample_steps)
        size = self.unet.config.sample_size
        self.shape = (self.unet.config.in_channels, size, size)
        self.generator = torch.Generator().manual_seed(config.seed)

    def _noise(self, count: int) -> torch.Tensor:
        noise = torch.randn((count, *self.shape), generator=self.generator)
        return noise.to(self.config.device) * self.scheduler.init_noise_sigma

    def _eps(self, latents, t, cond: _Cond) -> torch.Tensor:
        return self.unet(latents, t, **cond.unet_kwargs()).sample

    @torch.no_grad()
    def _sample_xt(self, cond: _Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t from the current model's guided trajectory, and its timestep t."""
        c = self.config
        low = int(c.t_range[0] * c.sample_steps)
        high = max(int(c.t_range[1] * c.sample_steps), low + 1)
        stop = int(torch.randint(low, high, (1,), generator=self.generator))
        latents = self._noise(len(cond))
        uncond = self.uncond.repeat(len(cond))
        for t in self.scheduler.timesteps[:stop]:
            both = self._eps(torch.cat([latents, latents]), t, uncond.cat(cond))
            eps_u, eps_c = both.chunk(2)
            eps = eps_u + c.sample_guidance * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        return latents, self.scheduler.timesteps[stop]

    @torch.no_grad()
    def _target(self, latents, t, cond) -> torch.Tensor:
        self.unet.disable_adapters()
        try:
            eps_c = self._eps(latents, t, cond)
            eps_u = self._eps(latents, t, self.uncond.repeat(len(cond)))
        finally:
            self.unet.enable_adapters()
        return eps_u - self.config.eta * (eps_c - eps_u)

    def run(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        c = self.config
        started = time.perf_counter()
        optimizer = torch.optim.Adam(self.trainable, lr=c.lr)
        first = last = None
        bar = tqdm(range(c.steps), desc=f"ESD-{c.mode}", unit="step", disable=not c.progress)
        for _ in bar:
            pick = torch.randint(len(self.cond), (c.batch,), generator=self.generator)
            cond = self.cond.take(pick.to(self.cond.states.device))
            latents, t = self._sample_xt(cond)
            target = self._target(latents, t, cond)
            loss = F.mse_loss(self._eps(latents, t, cond), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = loss.item()
            first = last if first is None else first
            bar.set_postfix(loss=f"{last:.4f}", refresh=False)
        report = self._report()
        report.update(
            mode=c.mode,
            adapted_modules=sum(1 for n, _ in self.unet.named_modules() if n.endswith(".lora_A")),
            trained_parameters=sum(p.numel() for p in self.trainable),
            prompts=len(self.prompts),
            loss_first=round(first, 6),
            loss_last=round(last, 6),
            seconds=round(time.perf_counter() - started, 3),
        )
        return self._tensors(), report

    @torch.no_grad()
    def _report(self) -> dict[str, Any]:
        """How far the adapter moves noise predictions: concept prompts vs concept-free ones."""
        mid = self.scheduler.timesteps[len(self.scheduler.timesteps) // 2]
        generator_state = self.generator.get_state()
        latents = self._noise(max(len(self.cond), len(self.probe)))
        self.generator.set_state(generator_state)

        def shift(states: _Cond) -> float:
            x = latents[: len(states)]
            adapted = self._eps(x, mid, states)
            self.unet.disable_adapters()
            try:
                base = self._eps(x, mid, states)
            finally:
                self.unet.enable_adapters()
            return float((adapted - base).norm() / base.norm())

        return {
            "concept_eps_shift": round(shift(self.cond), 6),
            "retain_eps_drift": round(shift(self.probe), 6),
            "retain_drift_on": "concept-free twins of the training prompts",
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
        return {
            f"unet.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()
        }


def erase_esd(pipe: Any, config: EsdConfig) -> EsdResult:
    """Train an ESD LoRA for `config.concepts` on `pipe`'s U-Net; returns a unet_lora patch."""
    config.check()
    family = pipeline_family(pipe)
    if family == "flux":
        raise WrongTarget(
            "ESD is implemented for U-Nets (SD 1.x/2.x, SDXL); Flux's transformer (flow "
            "matching, packed latents) is not supported yet"
        )
    torch.manual_seed(config.seed)
    reset_peak_memory(config.device)
    started = time.perf_counter()
    tensors, report = _Trainer(pipe, config).run()
    patch = Patch.create(
        pipe=pipe,
        kind="unet_lora",
        component="unet",
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
            "t_range": list(config.t_range),
            "seed": config.seed,
            "templates": list(config.resolved_templates()),
            "synonyms": {c.name: list(c.synonyms) for c in config.concepts},
            **config.extra,
        },
        eval={"unet": report},
    )
    peak, kind = peak_memory(config.device)
    return EsdResult(patch, report, time.perf_counter() - started, peak, kind)
