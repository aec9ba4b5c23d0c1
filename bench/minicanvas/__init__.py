"""MiniCanvas: the offline world where erasure is measured, and its trained model."""
