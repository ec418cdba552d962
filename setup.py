"""Plain-Python install: `pip install .` never runs nvcc. The CUDA kernels in csrc/ are shipped
as sources and JIT-built with ninja on first use (lightning_ops/ssm/cuda.py).

Packages: `lightning_ops` (ops, backends, kernels, compat) and `lightning_ops.layers`, whose
sources live in the top-level `layers/` folder (mapped here; no top-level `layers` package is
installed, so a user's own `layers.py` never collides with ours).

Dependencies: torch only (plus ninja, for the JIT build of the CUDA backend). Triton is used on
CUDA only and torch's CUDA wheels already bring it; `pip install .[triton]` asks for it
explicitly (e.g. to run the Triton kernels in the interpreter on CPU).
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CSRC = os.path.isdir(os.path.join(HERE, "csrc"))
HAS_LAYERS = os.path.isfile(os.path.join(HERE, "layers", "__init__.py"))

# lightning_ops/layers/ in the source tree is only a shim pointing at layers/ (see its
# docstring); the wheel gets the real sources under that name instead.
packages = find_packages(include=["lightning_ops", "lightning_ops.*"],
                         exclude=["lightning_ops.layers", "lightning_ops.layers.*"])
package_dir = {}
package_data = {}
if HAS_LAYERS:
    packages += ["lightning_ops.layers"] + [
        "lightning_ops.layers." + p for p in find_packages(where=os.path.join(HERE, "layers"))]
    package_dir["lightning_ops.layers"] = "layers"
if HAS_CSRC:  # csrc/ ships as sources inside the package (lightning_ops/csrc) for the JIT build
    packages.append("lightning_ops.csrc")
    package_dir["lightning_ops.csrc"] = "csrc"
    package_data["lightning_ops.csrc"] = ["*.cu", "*.cuh", "*.cpp", "*.h"]



class clean_build_py(build_py):
    """Stage into an empty build/lib: a stale one (an older layout, e.g. a top-level `layers`
    package) would otherwise end up in the wheel."""

    def run(self):
        if os.path.isdir(self.build_lib):
            shutil.rmtree(self.build_lib)
        super().run()


setup(
    name="lightning_ops",
    version="0.1.0",
    description="Kernels for linear-attention and state-space sequence models "
                "(GLA, DeltaNet, Mamba) in PyTorch, Triton and CUDA",
    python_requires=">=3.9",
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    cmdclass={"build_py": clean_build_py},
    install_requires=[
        "torch>=2.4",
        "ninja",
    ],
    extras_require={
        "triton": ["triton>=3.0; platform_system == 'Linux'"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0; platform_system == 'Linux'"],
        "bench": ["tqdm", "matplotlib"],
        # lightning_ops.models (Hugging Face models); accelerate is what transformers' Trainer needs
        "hf": ["transformers>=5.0", "accelerate"],
        # the peers, for the benchmark's comparisons with their pure-PyTorch references (providers
        # fla-naive, mamba-ref, conv1d-ref; benchmarks/registry.py). Never needed by the library,
        # make test or make bench. On a CPU machine use `make peers` instead: it installs these
        # into .venv without their dependencies (no second torch; mamba-ssm and causal-conv1d
        # from their sources without the CUDA extensions), which a plain pip install of this
        # extra does not do. (einops, which mamba-ssm imports, comes as its own dependency:
        # lightning_ops never imports it, so it is not ours to declare.)
        "peers": ["flash-linear-attention==0.6.0", "fla-core==0.6.0", "mamba-ssm>=2.2",
                  "causal-conv1d>=1.4"],
    },
)
