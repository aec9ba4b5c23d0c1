"""ESD (erased stable diffusion) as a U-Net LoRA: ESD-x (cross-attention), ESD-u (the rest)."""

from erasure.esd.config import EsdConfig
from erasure.esd.train import EsdResult, erase_esd

__all__ = ["EsdConfig", "EsdResult", "erase_esd"]
