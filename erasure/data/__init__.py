"""Data shipped with the erasure methods (the general retain set)."""
