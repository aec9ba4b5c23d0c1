"""MiniCanvas component configurations: real diffusers/transformers classes, small sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bench.minicanvas.tokenizer import MAX_LENGTH

LATENT_CHANNELS = 4
LATENT_SIZE = 8  # 32x32 images, two VAE downsamplings
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class ModelConfig:
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_intermediate: int = 512
    unet_channels: tuple[int, ...] = (48, 96, 96)
    unet_head_dim: int = 24
    vae_channels: tuple[int, ...] = (32, 64, 64)

    def to_dict(self) -> dict:
        return asdict(self)


def text_encoder(config: ModelConfig, vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.text_hidden,
            intermediate_size=config.text_intermediate,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=config.text_hidden,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


def vae(config: ModelConfig):
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=LATENT_CHANNELS,
        sample_size=32,
        norm_num_groups=16,
        mid_block_add_attention=False,
    )


def unet(config: ModelConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.unet_head_dim,
        norm_num_groups=24,
    )


# DDPM's linear schedule: its terminal SNR is ~4e-5, so sampling can start from pure noise
# without the train/test mismatch of SD's scaled_linear schedule at tiny latents.
_SCHEDULE = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_SCHEDULE)


def sampling_scheduler():
    """DDIM on the training schedule; `trailing` spacing starts sampling at t = 999."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_SCHEDULE, set_alpha_to_one=False, timestep_spacing="trailing")
