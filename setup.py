"""paddle-semoe: a PaddlePaddle-native Mixture-of-Experts training and inference system.

Paddle itself is not a hard requirement: CPU users install ``paddlepaddle==3.3.1`` from PyPI,
GPU users a current ``paddlepaddle-gpu`` from Paddle's own package index (see README).
The C++/CUDA operator sources ship as package data and are compiled on first use.
"""

from setuptools import find_packages, setup

setup(
    name="paddle-semoe",
    version="0.1.0",
    description="PaddlePaddle-native Mixture-of-Experts training and inference (SE-MoE)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # the config schema evaluates `X | None` annotations (PEP 604)
    packages=find_packages(include=["paddle_semoe", "paddle_semoe.*"]) + ["paddle_semoe._csrc"],
    package_dir={"paddle_semoe._csrc": "custom_ops"},
    package_data={"paddle_semoe._csrc": ["*.md", "include/semoe/*.h", "cpu/*.cc", "cpu/*.h", "cuda/*.cu", "cuda/*.cc", "cuda/*.h", "cuda/*.cuh"]},
    install_requires=["numpy", "pyyaml"],
    extras_require={
        "cpu": ["paddlepaddle==3.3.1"],
        "monitor": ["visualdl>=2.5"],
        "test": ["pytest"],
    },
)
