"""Plain-Python install: `pip install .` never runs nvcc. The CUDA kernels in csrc/ are shipped
as sources and JIT-built with ninja on first use (lightning_ops/ssm/cuda.py)."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CSRC = os.path.isdir(os.path.join(HERE, "csrc"))

setup(
    name="lightning_ops",
    version="0.1.0",
    description="Kernels for linear-attention and state-space sequence models "
                "(GLA, DeltaNet, Mamba) in PyTorch, Triton and CUDA",
    python_requires=">=3.9",
    packages=find_packages(include=["lightning_ops", "lightning_ops.*", "layers", "layers.*"])
    + (["lightning_ops.csrc"] if HAS_CSRC else []),
    # csrc/ ships as sources inside the package (lightning_ops/csrc) for the JIT build
    package_dir={"lightning_ops.csrc": "csrc"} if HAS_CSRC else {},
    package_data={"lightning_ops.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]} if HAS_CSRC else {},
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
