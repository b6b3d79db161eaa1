"""Packaging for megatron-lite.

The top-level ``kernels/`` folder installs as ``megatron_lite.kernels`` (``package_dir``), so there is
never a bare top-level ``kernels`` package. The sbatch templates in ``launch/`` ship the same
way, as package data of ``megatron_lite.launcher.templates`` (a folder without ``__init__.py``), so
``megatron-lite launch slurm`` finds them in a wheel install; ``launch/`` stays their one source.
torch is a floor, not a pin: a GPU machine keeps the user's own build; CPU installs pin the local
CPU wheel through ``requirements/cpu.txt``.
"""

from setuptools import find_packages, setup

_core = find_packages(include=["megatron_lite", "megatron_lite.*"])
_kernels = ["megatron_lite.kernels" + p[len("kernels") :] for p in find_packages(include=["kernels", "kernels.*"])]
_kernels = ["megatron_lite.kernels"] + _kernels
_templates = "megatron_lite.launcher.templates"  # launch/*.sbatch: see megatron_lite/launcher/slurm.py

setup(
    name="megatron-lite",
    version="0.1.0",
    description="A Megatron-style 3D-parallel pretraining framework that is easy to install, read and trust.",
    python_requires=">=3.10",
    packages=_core + sorted(set(_kernels)) + [_templates],
    package_dir={"megatron_lite": "megatron_lite", "megatron_lite.kernels": "kernels", _templates: "launch"},
    package_data={_templates: ["*.sbatch"]},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "sentencepiece", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton"],
        "dev": ["pytest", "pytest-timeout", "ruff==0.17.6", "triton"],  # ruff pinned: its format is part of CI
        "hf": ["transformers>=5", "safetensors"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        # checkpoint.dir=s3://...; s5cmd, when on PATH, uploads faster. s3fs >= 2024.1: beside moto's
        # botocore pins, pip otherwise backtracks to s3fs 0.4 (2020), which fsspec warns against
        "s3": ["fsspec", "s3fs>=2024.1"],
    },
    entry_points={"console_scripts": ["megatron-lite=megatron_lite.cli:main"]},
)
