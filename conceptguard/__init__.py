"""ConceptGuard: safe text-to-image serving with hot-swappable safety patches."""

from patches import __version__

__all__ = ["__version__"]
