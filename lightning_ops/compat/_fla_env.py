"""fla.utils and fla.ops.utils.cache as fla's own test files read them: the tolerance check
(assert_close), the device the tests allocate on, and the hardware / Triton flags they skip on.

Our own code (fla's is not copied). The flags describe THIS machine truthfully, read from torch
(and triton's version when it is installed), never from Triton's driver: a test that skips
without an NVIDIA GPU still skips here, and `device` is "cpu" where CUDA is absent, so fla's
op tests run on our torch backend.
"""
from __future__ import annotations

import enum
import logging
import os
import platform
import warnings
from typing import Tuple

import torch

logger = logging.getLogger("lightning_ops.compat.fla.utils")

# fla's CI relaxes assert_close to a warning for small errors; read the same variable
FLA_CI_ENV = os.getenv("FLA_CI_ENV") == "1"


# ---------------------------------------------------------------------------------------------
# tolerance checks (fla.utils.testing)
# ---------------------------------------------------------------------------------------------
def get_abs_err(x, y) -> float:
    """Largest absolute elementwise difference."""
    return (x.detach() - y.detach()).flatten().abs().max().item()


def get_err_ratio(x, y) -> float:
    """RMS of the difference relative to the RMS of x (the reference)."""
    d = (x.detach() - y.detach()).flatten()
    err = d.square().mean().sqrt().item()
    base = x.detach().flatten().square().mean().sqrt().item()
    return err / (base + 1e-8)


def assert_close(prefix, ref, tri, ratio, warning=False, err_atol=1e-6):
    """fla's check: passes at once when the largest absolute difference is <= err_atol;
    otherwise neither side may hold NaN and the relative RMS error must be < ratio (only a
    warning with warning=True, or under FLA_CI_ENV when the error is small anyway)."""
    abs_err = get_abs_err(ref, tri)
    rel = get_err_ratio(ref, tri)
    msg = f"{prefix:>16} diff: {abs_err:.6f} ratio: {rel:.6f}"
    logger.info(msg)
    if abs_err <= err_atol:
        return
    assert not torch.isnan(ref).any(), f"{prefix}: NaN detected in ref"
    assert not torch.isnan(tri).any(), f"{prefix}: NaN detected in tri"
    if warning or (FLA_CI_ENV and (rel < 0.01 or abs_err <= 0.3)):
        if rel > ratio:
            warnings.warn(msg)
    else:
        assert rel < ratio, msg


# ---------------------------------------------------------------------------------------------
# device and hardware flags (fla.utils.hardware)
# ---------------------------------------------------------------------------------------------
def _platform() -> str:
    if torch.cuda.is_available():
        return "hip" if getattr(torch.version, "hip", None) else "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return "cpu"


device_platform = _platform()
device = "cuda" if device_platform == "hip" else device_platform
device_name = device
device_torch_lib = getattr(torch, device)


def get_available_device() -> str:
    return device_platform


def _capability() -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(0)) if device_platform == "cuda" else (0, 0)


IS_AMD = device_platform == "hip"
IS_ARM = platform.machine().lower() in ("aarch64", "arm64")
IS_INTEL = device_platform == "xpu"
IS_INTEL_ALCHEMIST = IS_INTEL and "Intel(R) Arc(TM) A" in torch.xpu.get_device_name(0)
IS_NPU = False      # torch_npu devices are not served by lightning_ops
IS_NVIDIA = device_platform == "cuda"
IS_NVIDIA_HOPPER = IS_NVIDIA and _capability()[0] == 9
IS_NVIDIA_SM100 = IS_NVIDIA and _capability()[0] == 10
IS_NVIDIA_SM120 = IS_NVIDIA and _capability() == (12, 0)
IS_NVIDIA_BLACKWELL = IS_NVIDIA and _capability()[0] in (10, 12)
IS_TF32_SUPPORTED = IS_NVIDIA and _capability()[0] >= 8
IS_AMD_TMA_ARCH = False
# fla's TMA paths are opt-in (FLA_USE_TMA=1) and ours have none
IS_TMA_SUPPORTED = False

is_amd, is_arm, is_intel, is_nvidia, is_npu = IS_AMD, IS_ARM, IS_INTEL, IS_NVIDIA, IS_NPU
is_intel_alchemist, is_nvidia_hopper = IS_INTEL_ALCHEMIST, IS_NVIDIA_HOPPER
is_nvidia_blackwell, is_nvidia_sm100, is_tf32_supported = (IS_NVIDIA_BLACKWELL, IS_NVIDIA_SM100,
                                                           IS_TF32_SUPPORTED)


def _version(text: str) -> Tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


try:
    import triton as _triton
    _TRITON = _version(_triton.__version__)
    IS_GATHER_SUPPORTED = hasattr(_triton.language, "gather")
except ImportError:          # no triton: every "above" flag is False
    _TRITON = (0,)
    IS_GATHER_SUPPORTED = False

TRITON_ABOVE_3_4_0 = _TRITON >= (3, 4, 0)
TRITON_ABOVE_3_5_1 = _TRITON >= (3, 5, 1)
TRITON_ABOVE_3_6_0 = _TRITON >= (3, 6, 0)
TRITON_ABOVE_3_7_1 = _TRITON >= (3, 7, 1)
TRITON_ABOVE_3_8_0 = _TRITON >= (3, 8, 0)


def check_pytorch_version(version_s: str = "2.4") -> bool:
    return _version(torch.__version__) >= _version(version_s)


def get_multiprocessor_count(tensor_idx: int = 0, *, use_aicore: bool = False) -> int:
    if IS_NVIDIA or IS_AMD:
        return torch.cuda.get_device_properties(tensor_idx).multi_processor_count
    return 1


# ---------------------------------------------------------------------------------------------
# fla.ops.utils.cache: how fla picks kernel configs. We have no config cache; the mode is read
# from the same variable so tests that branch on it branch the same way.
# ---------------------------------------------------------------------------------------------
class FlaCacheMode(enum.Enum):
    DISABLED = "disabled"
    STRICT = "strict"
    FUZZY = "fuzzy"
    FULL = "full"
    DEFAULT = "default"
    ALWAYS = "always"

    def uses_default_config(self) -> bool:
        return self in (FlaCacheMode.FULL, FlaCacheMode.DEFAULT, FlaCacheMode.ALWAYS)

    @classmethod
    def from_env(cls) -> "FlaCacheMode":
        text = os.environ.get("FLA_CACHE_MODE", cls.DISABLED.value)
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"Invalid FLA_CACHE_MODE={text!r}. Valid values: "
                             f"{[m.value for m in cls]}") from None


FLA_CACHE_MODE = FlaCacheMode.from_env()
