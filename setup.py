"""Packaging for pae_fast.

``kernels/`` lives at the top of the repository (the kernels are the product's core) but is installed as the
subpackage ``pae_fast.kernels`` so that ``import kernels`` never resolves to this project.
"""

from pathlib import Path

from setuptools import find_packages, setup

_packages = find_packages(include=["pae_fast", "pae_fast.*"])
_packages += ["pae_fast.kernels", "pae_fast.kernels.tools", "pae_fast.configs"]

setup(
    name="pae_fast",
    version="0.1.0",
    description="Fast, fused-kernel Prior-Aligned Autoencoders (PAE) for latent diffusion",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages,
    package_dir={
        "pae_fast": "pae_fast",
        "pae_fast.kernels": "kernels",
        "pae_fast.kernels.tools": "kernels/tools",
        "pae_fast.configs": "configs",
    },
    package_data={"pae_fast.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "timm>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pillow>=9.0",
        "scikit-image>=0.22",  # the demo images ship inside its wheel (pae_fast.data.demo_images)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "flash": ["flash-attn>=2.5"],
        "xformers": ["xformers"],
        # only for tests/models/test_pae_convert_hf.py (HF encoders -> our converted VFMs); never imported by pae_fast
        "hf": ["transformers>=4.56,<5"],
        # weights=/vfm_weights=/latent_stats= as hf://<org>/<name>/<path-in-repo>, read through the hub's cache
        "hub": ["huggingface_hub>=0.20"],
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "ruff>=0.5",
        ],
    },
    entry_points={"console_scripts": ["pae-fast=pae_fast.__main__:main"]},
)
