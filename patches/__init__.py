"""Patch format, validation, registry, stacks and pipeline targets."""

__version__ = "0.1.0"
