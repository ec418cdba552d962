"""Plain-Python install: `pip install .` never runs nvcc. The CUDA kernels in csrc/ are shipped
as sources and JIT-built with ninja on first use (lightning_ops/ssm/cuda.py)."""
from setuptools import find_packages, setup

setup(
    name="lightning_ops",
    version="0.1.0",
    description="Kernels for linear-attention and state-space sequence models "
                "(GLA, DeltaNet, Mamba) in PyTorch, Triton and CUDA",
    python_requires=">=3.9",
    packages=find_packages(include=["lightning_ops", "lightning_ops.*", "layers", "layers.*"])
    + ["lightning_ops.csrc"],
    package_dir={"lightning_ops.csrc": "csrc"},
    package_data={"lightning_ops.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "einops",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["tqdm", "matplotlib"],
    },
)
