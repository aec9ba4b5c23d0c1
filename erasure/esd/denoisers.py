"""What ESD needs from a family's denoiser: its conditioning, its noise, one prediction, and
a trajectory from noise to x_t. The denoiser is a float32 copy of the pipeline's, with the
LoRA adapter being trained; switching the adapter off gives the frozen base prediction.

- U-Nets (SD 1.x/2.x, SDXL): DDIM trajectories on the pipeline's noise schedule, classifier-
  free guided; SDXL's added conditioning (pooled embedding, time ids) from `encode_prompt`.
- Flux's transformer: flow-matching Euler trajectories with the pipeline's shifted sigmas,
  packed latents and position ids; guidance is distilled into the model (a guidance
  embedding where the model has one), so trajectories use the conditional prediction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from erasure.esd.config import TARGET_MODULES, EsdConfig
from patches.errors import WrongTarget
from patches.targets import denoiser_component, pipeline_family

ADAPTER = "esd"


@dataclass
class Cond:
    """A batch of conditioning; `extra` holds per-row tensors, `fixed` shared ones."""

    states: torch.Tensor
    extra: dict[str, torch.Tensor]
    fixed: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.states)

    def take(self, index: torch.Tensor) -> Cond:
        return Cond(self.states[index], {k: v[index] for k, v in self.extra.items()}, self.fixed)

    def repeat(self, count: int) -> Cond:
        return self.take(torch.zeros(count, dtype=torch.long, device=self.states.device))

    def cat(self, other: Cond) -> Cond:
        extra = {k: torch.cat([v, other.extra[k]]) for k, v in self.extra.items()}
        return Cond(torch.cat([self.states, other.states]), extra, self.fixed)


def lora_copy(module: torch.nn.Module, targets: str, config: EsdConfig) -> torch.nn.Module:
    """A float32 copy of `module` with a fresh LoRA adapter (lora_B = 0) on `targets`."""
    from peft import LoraConfig

    model = copy.deepcopy(module).float().to(config.device)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.rank,  # scale 1: nothing to fold into lora_B
            target_modules=targets,
            init_lora_weights=True,
        ),
        adapter_name=ADAPTER,
    )
    adapted = [n for n, p in model.named_parameters() if ".lora_" in n]
    if not adapted:
        raise WrongTarget(f"ESD-{config.mode} found no layer to adapt in {type(module).__name__}")
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


class Denoiser:
    """The interface `erasure/esd/train.py` (and DuMo's training) trains against.

    `model` is the denoiser being trained: by default a float32 copy of the pipeline's with
    ESD's LoRA adapter; DuMo passes its own copy, with the eraser attached by a hook.
    `config` needs device, resolution, sample_steps and sample_guidance (and ESD's mode)."""

    component: str
    model: torch.nn.Module
    timesteps: torch.Tensor

    def __init__(self, pipe: Any, config: Any, model: torch.nn.Module | None = None):
        self.pipe, self.config = pipe, config
        self.component = denoiser_component(pipe)
        if model is None:
            targets = TARGET_MODULES[self.component][config.mode]
            model = lora_copy(getattr(pipe, self.component), targets, config)
        self.model = model

    def encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def noise(self, count: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def trajectory(
        self, cond: Cond, uncond: Cond, stop: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t after `stop` steps from noise, t) under the current model."""
        raise NotImplementedError


class UNetDenoiser(Denoiser):
    def __init__(self, pipe: Any, config: Any, model: torch.nn.Module | None = None):
        super().__init__(pipe, config, model)
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(config.sample_steps)
        self.timesteps = self.scheduler.timesteps
        size = (config.resolution or self._native()) // pipe.vae_scale_factor
        self.shape = (self.model.config.in_channels, size, size)

    def _native(self) -> int:
        return self.model.config.sample_size * self.pipe.vae_scale_factor

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        pipe, device = self.pipe, self.config.device
        on = pipe.text_encoder.device
        if pipeline_family(pipe) == "sdxl":
            states, _, pooled, _ = pipe.encode_prompt(
                prompts, device=on, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            size = self.config.resolution or self._native()
            time_ids = pipe._get_add_time_ids(
                (size, size),
                (0, 0),
                (size, size),
                dtype=torch.float32,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            )
            return Cond(
                states.float().to(device),
                {"text_embeds": pooled.float().to(device)},
                {"time_ids": time_ids.to(device)},
            )
        states, _ = pipe.encode_prompt(prompts, on, 1, False)
        return Cond(states.float().to(device), {}, {})

    def noise(self, count: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn((count, *self.shape), generator=generator)
        return noise.to(self.config.device) * self.scheduler.init_noise_sigma

    def predict(self, latents, t, cond: Cond) -> torch.Tensor:
        added = None
        if cond.extra:
            time_ids = cond.fixed["time_ids"].expand(len(cond), -1)
            added = {"text_embeds": cond.extra["text_embeds"], "time_ids": time_ids}
        return self.model(
            latents, t, encoder_hidden_states=cond.states, added_cond_kwargs=added
        ).sample

    @torch.no_grad()
    def trajectory(self, cond, uncond, stop, generator):
        latents = self.noise(len(cond), generator)
        both_cond = uncond.cat(cond)
        for t in self.timesteps[:stop]:
            both = self.predict(torch.cat([latents, latents]), t, both_cond)
            eps_u, eps_c = both.chunk(2)
            eps = eps_u + self.config.sample_guidance * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        return latents, self.timesteps[stop]


class FluxDenoiser(Denoiser):
    MAX_SEQUENCE_LENGTH = 512

    def __init__(self, pipe: Any, config: Any, model: torch.nn.Module | None = None):
        super().__init__(pipe, config, model)
        self.size = config.resolution or 512
        factor = pipe.vae_scale_factor * 2  # VAE downsampling, then 2x2 packing
        self.seq_len = (self.size // factor) ** 2
        self.channels = self.model.config.in_channels // 4
        self._set_timesteps()
        self.timesteps = self.scheduler.timesteps

    def _set_timesteps(self) -> None:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        self.scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        cfg = self.scheduler.config
        mu = calculate_shift(
            self.seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        steps = self.config.sample_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        retrieve_timesteps(self.scheduler, steps, self.config.device, sigmas=sigmas, mu=mu)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        pipe, device = self.pipe, self.config.device
        states, pooled, text_ids = pipe.encode_prompt(
            prompts,
            None,
            device=pipe.text_encoder.device,
            max_sequence_length=self.MAX_SEQUENCE_LENGTH,
        )
        return Cond(
            states.float().to(device),
            {"pooled_projections": pooled.float().to(device)},
            {"txt_ids": text_ids.to(device)},
        )

    def noise(self, count: int, generator: torch.Generator) -> torch.Tensor:
        latents, image_ids = self.pipe.prepare_latents(
            count,
            self.channels,
            self.size,
            self.size,
            torch.float32,
            "cpu",
            generator,
        )
        self.image_ids = image_ids.to(self.config.device)
        return latents.to(self.config.device)

    def predict(self, latents, t, cond: Cond) -> torch.Tensor:
        batch = len(latents)
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((batch,), self.config.sample_guidance, device=latents.device)
        return self.model(
            hidden_states=latents,
            timestep=(t / 1000).expand(batch).to(latents.device),
            guidance=guidance,
            pooled_projections=cond.extra["pooled_projections"],
            encoder_hidden_states=cond.states,
            txt_ids=cond.fixed["txt_ids"],
            img_ids=self.image_ids,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def trajectory(self, cond, uncond, stop, generator):
        self._set_timesteps()  # Flow-matching Euler keeps a step index: start afresh
        latents = self.noise(len(cond), generator)
        for t in self.scheduler.timesteps[:stop]:
            latents = self.scheduler.step(self.predict(latents, t, cond), t, latents).prev_sample
        return latents, self.scheduler.timesteps[stop]


def denoiser_for(pipe: Any, config: Any, model: torch.nn.Module | None = None) -> Denoiser:
    return (
        FluxDenoiser(pipe, config, model)
        if pipeline_family(pipe) == "flux"
        else UNetDenoiser(pipe, config, model)
    )
