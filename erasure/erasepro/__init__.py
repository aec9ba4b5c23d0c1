"""ErasePro: zero-residual closed-form edits, applied progressively from shallow to deep."""

from erasure.erasepro.config import CHAINS, EraseProConfig
from erasure.erasepro.edit import EraseProResult, erase_erasepro

__all__ = ["CHAINS", "EraseProConfig", "EraseProResult", "erase_erasepro"]
