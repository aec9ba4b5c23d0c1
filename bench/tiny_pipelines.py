"""Tiny SD-1.x-, SDXL- and Flux-shaped pipelines, built offline from configs.

Each builder creates the components with a fixed seed, writes them with `save_pretrained`
and loads them back with `from_pretrained`, so tests and benchmarks exercise the same
loading path a real model folder goes through. Weights are random; shapes and module names
are those of the real families.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from patches.loading import load_pipeline

# A byte-level CLIP vocabulary (256 byte characters, their end-of-word forms, start/end
# tokens) needs no vocab file, which transformers 5.x no longer ships.
_CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable-character map.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def byte_level_clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LENGTH)


def _clip_config(hidden: int, with_projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def _vae(**overrides):
    from diffusers import AutoencoderKL

    config = {
        "block_out_channels": (32, 64),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "sample_size": 32,
    }
    return AutoencoderKL(**{**config, **overrides})


def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }
    return UNet2DConditionModel(**{**config, **overrides})


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build_sd(seed: int):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=32, attention_head_dim=8)
    text_encoder = CLIPTextModel(_clip_config(32))
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=byte_level_clip_tokenizer(),
        unet=unet,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
        cross_attention_dim=64,  # 32 + 32 from the two encoders
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config(32)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(32)),
        tokenizer=byte_level_clip_tokenizer(),
        tokenizer_2=byte_level_clip_tokenizer(),
        unet=unet,
        scheduler=_ddim(),
        force_zeros_for_empty_prompt=True,
    )


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # A Unigram vocabulary of single characters plus special pieces, no sentencepiece file.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(chr(c), -3.0) for c in range(ord("0"), ord("9") + 1)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _build_flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    t5_tokenizer = _t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        )
    )
    vae = _vae(
        latent_channels=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModel(_clip_config(32)),
        tokenizer=byte_level_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


BUILDERS: dict[str, Callable[[int], object]] = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "flux": _build_flux,
}


def save_tiny_pipeline(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny `family` pipeline with `seed` and write it as a diffusers folder."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(BUILDERS)}")
    path = Path(path)
    BUILDERS[family](seed).save_pretrained(path)
    return path


def tiny_pipeline(family: str, cache_dir: str | os.PathLike, seed: int = 0):
    """The tiny pipeline, saved under `cache_dir` once and then loaded with from_pretrained."""
    path = Path(cache_dir) / f"tiny-{family}-seed{seed}"
    if not (path / "model_index.json").exists():
        save_tiny_pipeline(family, path, seed)
    return load_pipeline(path)
