"""Evaluate a tokenizer checkpoint (rFVD, PSNR, SSIM, LPIPS): `python -m coordtok_jax.evaluate` (console script coordtok-evaluate).

The tool lives in coordtok_jax/evaluate/run.py; its --help shows that module's documentation.
"""

from coordtok_jax.evaluate.run import run

if __name__ == "__main__":
    run()
