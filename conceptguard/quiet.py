"""Third-party output that is not the user's concern, silenced at its source.

- transformers warns, on every process that loads a pipeline, that it falls back to its PIL
  image processors because torchvision is missing; ConceptGuard never uses them.
- Loading a local model shows diffusers' and transformers' per-component progress bars; the
  server prints one line instead.
- Every tqdm bar, even a disabled one (diffusers makes one per pipeline call), takes a lock
  that tqdm creates as a multiprocessing lock; one made in a spawned server worker, which
  stops on SIGTERM, is reported as a "leaked semaphore" at every server stop.

Both are narrow: no other warning is hidden, and downloads keep their progress bars.
"""

from __future__ import annotations

import logging
import threading

# logger name -> message fragments to drop
_DROPPED = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_known_warnings() -> None:
    """Drop the warnings above (idempotent)."""
    for name, fragments in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))


def quiet_model_loading() -> None:
    """No per-component progress bars while a pipeline loads (call after any download)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def thread_only_tqdm_lock() -> None:
    """Give tqdm a thread lock, for a process whose bars are never shared with another one
    (a server worker): no multiprocessing lock is created to be leaked."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
