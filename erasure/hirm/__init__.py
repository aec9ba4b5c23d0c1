"""HiRM: train the first text-encoder block(s), with the loss on the states the denoiser reads."""

from erasure.hirm.config import VARIANTS, HirmConfig
from erasure.hirm.train import HirmResult, erase_hirm

__all__ = ["VARIANTS", "HirmConfig", "HirmResult", "erase_hirm"]
