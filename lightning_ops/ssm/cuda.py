"""CUDA backend of the Mamba-1 selective scan: csrc/selective_scan.cu (+ its torch binding),
JIT-built with torch.utils.cpp_extension + ninja on first use, for the local GPU's arch only.

Importing this module builds (or loads the cached build of) the extension. Without a GPU, nvcc,
ninja or the csrc/ sources, or when the build fails, the import raises
lightning_ops.backend.BackendUnavailableError saying what is missing; `import lightning_ops`
never imports this module eagerly, so it never fails because of it.

Implements the "selective_scan" family contract of lightning_ops/ssm/ops.py. float64 inputs
(which the kernel does not take) run on the torch backend's implementation.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..backend import BackendUnavailableError
from . import torch as _torch_impl

CHUNK = 1024  # tokens per saved carry; must equal csrc's kChunk (checked after the build)
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_SOURCES = ("selective_scan.cu", "selective_scan_binding.cpp")


def _missing():
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME) to build csrc/"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja), needed to build csrc/"
    absent = [s for s in _SOURCES if not (_CSRC / s).exists()]
    if absent:
        return f"the CUDA sources {absent} are not in {_CSRC} (install from a source checkout)"
    return None


def _build():
    from torch.utils import cpp_extension
    major, minor = torch.cuda.get_device_capability()
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # the local arch only
    try:
        return cpp_extension.load(
            name=f"lightning_ops_selective_scan_sm{major}{minor}",
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            verbose=os.environ.get("LIGHTNING_OPS_VERBOSE_BUILD") == "1")
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


class CudaUnavailableError(BackendUnavailableError, ImportError):
    """Also an ImportError, so lightning_ops.backend caches the failed import (no rebuild
    attempt on every call) and reports its message."""


_why = _missing()
if _why is not None:
    raise CudaUnavailableError(f"the cuda selective-scan backend is unavailable: {_why}")
try:
    _ext = _build()
except Exception as e:  # a failed build makes the backend unavailable, with the reason
    raise CudaUnavailableError(
        f"the cuda selective-scan backend is unavailable: building csrc/ failed: {e}") from e
if _ext.CHUNK != CHUNK:
    raise CudaUnavailableError(f"csrc kChunk {_ext.CHUNK} != lightning_ops CHUNK {CHUNK}")


def _kernel_dtype(u: torch.Tensor) -> bool:
    return u.dtype in (torch.float32, torch.float16, torch.bfloat16)


def scan_aux_shape(u, A):
    if not _kernel_dtype(u):
        return _torch_impl.scan_aux_shape(u, A)
    b, d, L = u.shape
    return (b, d, (L + CHUNK - 1) // CHUNK, A.shape[1])


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Kernel layout: everything contiguous; delta, B, C, z in u's dtype; A, D, bias fp32;
    B/C always [b, G, N, L]."""
    dt = u.dtype
    B4 = B if B.dim() == 4 else B[:, None]
    C4 = C if C.dim() == 4 else C[:, None]

    def conv(t, dtype):
        return None if t is None else t.to(dtype).contiguous()
    return (u.contiguous(), conv(delta, dt), conv(A, torch.float32), conv(B4, dt), conv(C4, dt),
            conv(D, torch.float32), conv(z, dt), conv(delta_bias, torch.float32))


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    if not _kernel_dtype(u):
        return _torch_impl.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        return_last_state)
    out, last, carries = _ext.fwd(*_prepare(u, delta, A, B, C, D, z, delta_bias),
                                  bool(delta_softplus))
    return out, (last if return_last_state else None), carries


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, aux, dy, dlast):
    if not _kernel_dtype(u):
        return _torch_impl.scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                         aux, dy, dlast)
    args = _prepare(u, delta, A, B, C, D, z, delta_bias)
    dl = None if dlast is None else dlast.to(torch.float32).contiguous()
    du, ddelta, dz, dA, dBp, dCp, dD, ddb = _ext.bwd(*args, bool(delta_softplus), aux,
                                                     dy.to(u.dtype).contiguous(), dl)
    # the kernel leaves cross-block sums to us (fixed order: deterministic)
    dB, dC = dBp.sum(2), dCp.sum(2)
    if B.dim() == 3:
        dB, dC = dB[:, 0], dC[:, 0]
    return (du, ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else ddb.sum(0).to(delta_bias.dtype))
