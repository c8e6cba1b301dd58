"""coordtok-jax: CoordTok long-video tokenizer and triplane SiT in JAX/Flax NNX."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2",
    "tensorflow-datasets>=4.9",
    "ml_collections>=1.0",
    "einops>=0.8",
    "absl-py>=2.0",
    "etils[epath]>=1.7",
    "numpy>=1.26",
    "pillow>=10.0",
    "tqdm>=4.60",
    "av>=12.0",  # PyAV: video decoding for the folder source and prepare
    "array_record>=0.5",
    "gcsfs>=2024.2",  # gs:// through etils.epath without TensorFlow
    "tensorboardX>=2.6",
    "dm-pix>=0.4",  # SSIM
]

EXTRAS = {
    # Conversion to/from the official PyTorch checkpoints. Pin the CPU wheel that the
    # project's machines carry; any torch>=2.1 works for users.
    "torch": ["torch>=2.1"],
    # TFDS video features are encoded/decoded with TensorFlow (the CPU build is enough).
    "tfds": ["tensorflow-cpu>=2.15"],
    # libtpu: run on TPU VMs, and compile TPU programs on any host (python -m coordtok_jax.compile
    # --topology=v5e-256). jax[tpu] pins the libtpu that matches jax (0.10.2 -> libtpu 0.0.42.1).
    "tpu": ["jax[tpu]==0.10.2"],
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        "scikit-image>=0.22",
        "scipy>=1.10",
        "gcp-storage-emulator>=2024.8",  # offline gs:// (tests/gcs_emulator.py)
        "google-cloud-storage>=2.14",
        "tensorflow-cpu>=2.15",  # the TFDS tests; the core suite also runs without it
    ],
}

setup(
    name="coordtok-jax",
    version="0.1.0",
    description=(
        "JAX/Flax implementation of CoordTok (Efficient Long Video Tokenization via "
        "Coordinate-based Patch Reconstruction) and its triplane SiT generator"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["coordtok_jax", "coordtok_jax.*"]),
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            f"coordtok-{tool.replace('_', '-')}=coordtok_jax.{module}:run" for tool, module in (
                ("demo", "demo"), ("prepare", "prepare"), ("train", "train.__main__"),
                ("convert", "convert.__main__"), ("evaluate", "evaluate.__main__"),
                ("reconstruct", "reconstruct"), ("train_sit", "train_sit"), ("sample", "sample"),
                ("encode_latents", "encode_latents"), ("compile", "compile"),
                ("train_scorer", "train_scorer"))
        ],
    },
    license="MIT",
)
