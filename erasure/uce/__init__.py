"""UCE: Unified Concept Editing, a closed-form edit of the denoiser's text key/value
projections."""

from erasure.uce.config import UceConfig
from erasure.uce.edit import UceResult, erase_uce

__all__ = ["UceConfig", "UceResult", "erase_uce"]
