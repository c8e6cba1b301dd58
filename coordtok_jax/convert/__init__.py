"""Checkpoint conversion between this implementation and the official PyTorch code: parameter
mappings (coordtok, sit, torch_io), the commands (commands; `python -m coordtok_jax.convert`) and
PyTorch transcriptions of the official models (torch/)."""
