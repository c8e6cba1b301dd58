"""Reading and writing what runs leave behind: PyTorch .pth files without torch (pth), Orbax
checkpoints of a workdir (checkpoint), and loading a trained run's model (runs)."""
