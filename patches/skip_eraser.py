"""The `dumo_epr` module type: DuMo's eraser on a U-Net's skip connections.

EPR ("eraser with prior knowledge", DuMo, arXiv 2501.01125) is an encoder shaped like the
U-Net's own down path and mid block - conv_in, the time embedding, the down blocks, the mid
block - that sees the same noisy latent, timestep and text states as the U-Net. Each of its
skip features (conv_in's output and every down-block residual) and its mid-block output
goes through a 1x1 convolution, zero-initialised, to the U-Net's channel count, and is added
to the frozen U-Net's matching skip connection and mid block. Two factors scale every
output, per row:
- TLMO, time-layer modulation: a table scale[timestep bucket][output] (20 buckets of the
  1000 training timesteps by default), learned after the eraser itself, so erasure acts
  where it is needed and generation is left alone elsewhere;
- the prompt gate: g = clamp((s - low) / (high - low), 0, 1), where s is the largest cosine
  similarity between the row's text states (start token excluded) and the erased concept's
  token states stored in the patch, and low/high are calibrated when the patch is made
  (the concept's prompts above high, other prompts below low). With contrast states (other
  prompts' token and padding states, also stored), s is contrastive: per token, its
  similarity to the concept minus its similarity to the nearest contrast state, maximised
  over the tokens, padding included; a token that is as close to other prompts as to the
  concept (a shared word, a padding state) then scores about 0 however close it is to the
  concept. The gate reads only what the U-Net reads, so it works per row in a batch mixing
  tenants. (The paper also counts token overlap with the target word; the U-Net never sees
  token ids, so that term is not used.)
`width` scales the encoder's channels (a narrower copy for large bases); at width 1 it is
initialised from the U-Net's own weights (prior knowledge), below 1 from their leading
channels. The U-Net's class/added embeddings (SDXL's pooled text and size ids) are not fed
to the eraser: its time embedding is the timestep's alone.

Tensors in a patch: `module.<encoder parameter>` (the encoder, the output convolutions,
`module.gate_target` [tokens, text width], with `gate_contrast_tokens` in the config
`module.gate_contrast` [contrast tokens, text width]) and `tlmo.scale` [buckets, outputs].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from patches.errors import WrongTarget
from patches.signature import ComponentSignature
from patches.unet_modules import SkipModule, SkipResiduals, UnetModuleType, register_module_type

NAME = "dumo_epr"
DEFAULT_BUCKETS = 20
DEFAULT_TRAIN_TIMESTEPS = 1000
_ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")


def _narrow(unet_config: Mapping[str, Any], width: float) -> dict[str, Any]:
    """The U-Net config with channels scaled by `width` (multiples of the norm groups)."""
    if not 0 < width <= 1:
        raise WrongTarget(f"a dumo_epr module's width must be in (0, 1], not {width}")
    groups = int(unet_config.get("norm_num_groups") or 32)
    channels = [
        max(groups, round(c * width / groups) * groups) for c in unet_config["block_out_channels"]
    ]
    return {**unet_config, "block_out_channels": channels}


class SkipEraser(SkipModule):
    """The eraser encoder, its output convolutions, the gate and the TLMO table."""

    def __init__(self, unet_config: Mapping[str, Any], module_config: Mapping[str, Any]):
        super().__init__()
        from diffusers import UNet2DConditionModel

        if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
            raise WrongTarget("a dumo_epr module needs a U-Net with a mid block")
        self.width = float(module_config.get("width", 1.0))
        self.buckets = int(module_config.get("buckets", DEFAULT_BUCKETS))
        self.train_timesteps = int(module_config.get("train_timesteps", DEFAULT_TRAIN_TIMESTEPS))
        gate = module_config.get("gate")
        self.gate_range = None if gate is None else (float(gate["low"]), float(gate["high"]))
        config = _narrow(unet_config, self.width)
        with torch.device("meta"):
            skeleton = UNet2DConditionModel.from_config(config)
        for part in _ENCODER_PARTS:
            setattr(self, part, getattr(skeleton, part))
        ours = self._skip_channels(config)
        theirs = self._skip_channels(unet_config)
        with torch.device("meta"):
            self.skip_outs = torch.nn.ModuleList(
                torch.nn.Conv2d(a, b, 1) for a, b in zip(ours[:-1], theirs[:-1], strict=True)
            )
            self.mid_out = torch.nn.Conv2d(ours[-1], theirs[-1], 1)
        self.outputs = len(ours)
        tokens = int(module_config.get("gate_tokens", 1))
        text_width = unet_config["cross_attention_dim"]
        self.gate_target = torch.nn.Parameter(
            torch.empty(tokens, text_width, device="meta"), requires_grad=False
        )
        contrast = int(module_config.get("gate_contrast_tokens", 0))
        self.gate_contrast = None
        if contrast:
            empty = torch.empty(contrast, text_width, device="meta")
            self.gate_contrast = torch.nn.Parameter(empty, requires_grad=False)
        self.tlmo = torch.nn.Parameter(torch.empty(self.buckets, self.outputs, device="meta"))

    @staticmethod
    def _skip_channels(config: Mapping[str, Any]) -> list[int]:
        """Channels of every skip connection (conv_in's output, each down block's
        residuals), then of the mid block's output."""
        channels = list(config["block_out_channels"])
        layers = config["layers_per_block"]
        per_block = [layers] * len(channels) if isinstance(layers, int) else list(layers)
        skips = [channels[0]]
        for i, c in enumerate(channels):
            skips += [c] * per_block[i]
            if i < len(channels) - 1:
                skips.append(c)  # the downsampler's output
        return [*skips, channels[-1]]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The patch tensors this module is made of (names as in a patch)."""
        named = {f"module.{k}": v for k, v in self.state_dict().items() if k != "tlmo"}
        return {**named, "tlmo.scale": self.tlmo.detach()}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        state = {k.removeprefix("module."): v for k, v in tensors.items() if k != "tlmo.scale"}
        state["tlmo"] = tensors["tlmo.scale"]
        self.load_state_dict(state, strict=True, assign=True)

    def row_scale(self, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Per row and output: TLMO at the row's timestep bucket, times the prompt gate."""
        size = self.train_timesteps / self.buckets
        bucket = (timestep.float() / size).long().clamp(0, self.buckets - 1)
        scale = self.tlmo[bucket]
        return scale * self.gate(states)[:, None]

    def gate(self, states: torch.Tensor) -> torch.Tensor:
        """How much each row's prompt is about the erased concept, in [0, 1]."""
        if self.gate_range is None:
            return states.new_ones(states.shape[0])
        low, high = self.gate_range
        score = gate_score(states, self.gate_target, self.gate_contrast)
        return ((score - low) / (high - low)).clamp(0, 1)

    def forward(
        self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor
    ) -> SkipResiduals:
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        hidden = self.conv_in(sample)
        skips = [hidden]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, residuals = block(
                    hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states
                )
            else:
                hidden, residuals = block(hidden_states=hidden, temb=emb)
            skips.extend(residuals)
        hidden = self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        scale = self.row_scale(t, encoder_hidden_states).to(sample.dtype)
        down = tuple(
            conv(skip) * scale[:, i, None, None, None]
            for i, (conv, skip) in enumerate(zip(self.skip_outs, skips, strict=True))
        )
        return SkipResiduals(down, self.mid_out(hidden) * scale[:, -1, None, None, None])


def concept_similarity(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: the largest cosine similarity between its token states (the start token,
    identical for every prompt, excluded) and the concept's token states."""
    rows = torch.nn.functional.normalize(states[:, 1:].float(), dim=-1)
    concept = torch.nn.functional.normalize(target.float(), dim=-1)
    return torch.einsum("btd,kd->btk", rows, concept).amax(dim=(1, 2))


def gate_score(
    states: torch.Tensor, target: torch.Tensor, contrast: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row: `concept_similarity`, or with `contrast` states its contrastive form - per
    token, the similarity to the concept minus that to the nearest contrast state, at the
    token where that difference is largest."""
    if contrast is None:
        return concept_similarity(states, target)
    rows = torch.nn.functional.normalize(states[:, 1:].float(), dim=-1)
    concept = torch.nn.functional.normalize(target.float(), dim=-1)
    others = torch.nn.functional.normalize(contrast.float(), dim=-1)
    near = torch.einsum("btd,kd->btk", rows, concept).amax(dim=2)
    away = torch.einsum("btd,kd->btk", rows, others).amax(dim=2)
    return (near - away).amax(dim=1)


def initialised_from(unet: Any, module: SkipEraser) -> SkipEraser:
    """Materialise `module` with the U-Net's own weights (its leading channels below width
    1), zero output convolutions and TLMO at 1: an eraser that changes nothing yet."""
    source = unet.state_dict()
    device, dtype = unet.device, unet.dtype
    state = {}
    for name, meta in module.state_dict(keep_vars=True).items():
        part = name.split(".", 1)[0]
        if part in _ENCODER_PARTS:
            full = source[name]
            state[name] = full[tuple(slice(0, n) for n in meta.shape)].clone()
        elif name == "tlmo":
            state[name] = torch.ones(meta.shape, dtype=dtype, device=device)
        else:
            state[name] = torch.zeros(meta.shape, dtype=dtype, device=device)
    module.load_state_dict(state, strict=True, assign=True)
    module.gate_target.requires_grad_(False)
    if module.gate_contrast is not None:
        module.gate_contrast.requires_grad_(False)
    return module


class SkipEraserType(UnetModuleType):
    name = NAME

    def expected_shapes(
        self, config: Mapping[str, Any], unet: ComponentSignature
    ) -> dict[str, tuple[int, ...]]:
        if "block_out_channels" not in unet.config or "conv_in.weight" not in unet.parameters:
            raise WrongTarget("a dumo_epr module needs a U-Net (UNet2DConditionModel)")
        module = SkipEraser(unet.config, config)
        return {name: tuple(t.shape) for name, t in module.state_tensors().items()}

    def build(
        self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], unet: Any
    ) -> SkipModule:
        module = SkipEraser(dict(unet.config), config)
        param = next(unet.parameters())
        module.load_tensors({k: v.to(param) for k, v in tensors.items()})
        module.requires_grad_(False)
        return module


register_module_type(SkipEraserType())
