"""Checkpoint conversion: torch-free readers of PyTorch checkpoint files."""
