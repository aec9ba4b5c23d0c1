"""DuMo: an eraser on the U-Net's skip connections with time-layer modulation."""

from erasure.dumo.config import DumoConfig
from erasure.dumo.train import DumoResult, erase_dumo

__all__ = ["DumoConfig", "DumoResult", "erase_dumo"]
