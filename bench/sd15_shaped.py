"""An SD-1.5-shaped pipeline with random weights, built from configs and saved as a stock
diffusers folder: what the GPU benchmarks serve when no real weights can be had (speed and
memory depend on shapes, not on what the weights know).

U-Net: SD 1.5's configuration (320/640/1280/1280 channels, 2 layers per block, 16
cross-attention layers over 768-wide text states, 64x64 latents = 512x512 images); VAE: SD's
(128/256/512/512); text encoder: CLIP ViT-L/14's (bench/hirm_cost.py) with a byte-level
tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def sd15_shaped_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.hirm_cost import CLIP_L
    from bench.tiny_pipelines import _ddim, byte_level_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer()
    text_config = CLIPTextConfig(
        **CLIP_L,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_sd15_shaped(path: str | os.PathLike, dtype: str = "float16", seed: int = 0) -> Path:
    """Build once and save (weights in `dtype`); an existing folder is reused."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        pipe = sd15_shaped_pipeline(seed).to(dtype=getattr(torch, dtype))
        pipe.save_pretrained(path)
    return path
