"""Cost figures every method reports."""

from __future__ import annotations

import resource

import torch


def reset_peak_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what was measured): allocated GPU memory on CUDA, else the process's peak RSS."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"
