"""MiniCanvas, offline test pipelines and benchmarks."""
