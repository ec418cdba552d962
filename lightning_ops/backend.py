"""Backend choice: which implementation (torch | triton | cuda) runs an op.

Default by device: CPU tensors -> torch; CUDA tensors -> the fastest implemented backend of the
op's family. Override with env LIGHTNING_OPS_BACKEND (process-wide) or `use_backend(name)` (local
to the calling thread / asyncio task: a contextvars.ContextVar). An explicitly asked backend that
is unavailable raises an error naming what is missing; it never silently falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import shutil
import sys
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")

# family -> backends that implement it, fastest first (the default order on CUDA)
_FAMILY_BACKENDS: Dict[str, Tuple[str, ...]] = {
    "gla": ("triton", "torch"),
    "delta": ("triton", "torch"),
    "selective_scan": ("cuda", "triton", "torch"),
    "ssd": ("triton", "torch"),
    "conv": ("triton", "torch"),
    "loglinear": ("triton", "torch"),  # chunk_log_linear_attn (triton: the forward kernels)
    "loglinear_delta": ("triton", "torch"),  # log-linear Gated DeltaNet (triton: the forward)
}
# (family, backend) -> module implementing it
_MODULES: Dict[Tuple[str, str], str] = {
    ("gla", "torch"): "lightning_ops.chunk.torch",
    ("gla", "triton"): "lightning_ops.chunk.triton",
    ("delta", "torch"): "lightning_ops.delta.torch",
    ("delta", "triton"): "lightning_ops.delta.triton",
    ("selective_scan", "torch"): "lightning_ops.ssm.torch",
    ("selective_scan", "triton"): "lightning_ops.ssm.triton",
    ("selective_scan", "cuda"): "lightning_ops.ssm.cuda",
    ("ssd", "torch"): "lightning_ops.ssm.torch",
    ("ssd", "triton"): "lightning_ops.ssm.triton",
    ("conv", "torch"): "lightning_ops.ssm.torch",
    ("conv", "triton"): "lightning_ops.ssm.triton",
    ("loglinear", "torch"): "lightning_ops.loglinear.torch",
    ("loglinear", "triton"): "lightning_ops.loglinear.triton",
    ("loglinear_delta", "torch"): "lightning_ops.loglinear.delta",
    ("loglinear_delta", "triton"): "lightning_ops.loglinear.triton_delta",
}

# use_backend() stack (innermost last). The ContextVar is the truth: each thread and each asyncio
# task sees only its own blocks. torch.compile cannot trace ContextVar.get, so use_backend also
# mirrors the stack into a threading.local, which dynamo traces and guards on (per thread: a
# compiled function called in another block recompiles rather than reuse the other choice).
_forced: contextvars.ContextVar[Tuple[str, ...]] = contextvars.ContextVar(
    "lightning_ops_backend", default=())


_mirror = threading.local()


def _mirrored() -> Tuple[str, ...]:
    return getattr(_mirror, "stack", ())


class BackendUnavailableError(RuntimeError):
    """The asked-for backend cannot run here; the message says what is missing."""


def _triton_missing(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the 'triton' package is not installed (pip install triton)"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before import to run on "
            f"{device.type} tensors through the interpreter")


def _cuda_missing(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME) to build csrc/"
    return None


def family_backends(family: str) -> Tuple[str, ...]:
    """The backends that implement `family`, fastest first."""
    return _FAMILY_BACKENDS[family]


def missing(backend: str, device: torch.device, family: Optional[str] = None) -> Optional[str]:
    """Why `backend` cannot run `family` on `device`, or None if it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    if family is not None and backend not in _FAMILY_BACKENDS[family]:
        return (f"the {family} ops have no {backend} backend; available: "
                f"{_FAMILY_BACKENDS[family]}")
    if backend == "triton":
        return _triton_missing(device)
    if backend == "cuda":
        return _cuda_missing(device)
    return None


_ENV_VAR = "LIGHTNING_OPS_BACKEND"
# os.environ's own key for it (bytes on POSIX): eager calls read os.environ._data directly
_ENV_KEY = os.environ.encodekey(_ENV_VAR) if hasattr(os.environ, "encodekey") else None
_env_parsed: Tuple[object, Optional[str]] = (None, None)  # (raw value, its backend name)


def _env_backend() -> Optional[str]:
    """LIGHTNING_OPS_BACKEND stripped and lower-cased, None when unset or empty. Read on every
    call, so a change takes effect at once; but cheaply, since it sits on every op's path (a
    decode step's wrapper is measured in microseconds): os.environ.get costs four Python-level
    calls (Mapping.get, __getitem__, encodekey, decodevalue), so the value is looked up in
    os.environ's own dict, the dict os.environ.get reads and assignments to os.environ update,
    and parsed only when it differs from the last one seen."""
    global _env_parsed
    env = os.environ
    data = getattr(env, "_data", None)
    if _ENV_KEY is None or type(data) is not dict:  # os.environ replaced by another mapping
        raw = env.get(_ENV_VAR)
    else:
        raw = data.get(_ENV_KEY)
    if raw is None:
        return None
    last = _env_parsed
    if raw == last[0]:
        return last[1]
    text = raw if isinstance(raw, str) else env.decodevalue(raw)
    name = text.strip().lower() or None
    _env_parsed = (raw, name)
    return name


def requested() -> Optional[str]:
    """The backend forced by use_backend() (innermost, in this thread / task) or
    LIGHTNING_OPS_BACKEND, if any."""
    if torch.compiler.is_compiling():  # what dynamo traces: the per-thread mirror, os.environ
        stack = _mirrored()
        if stack:
            return stack[-1]
        env = os.environ.get(_ENV_VAR, "").strip().lower()
        return env or None
    stack = _forced.get()
    if stack:
        return stack[-1]
    return _env_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for ops called inside the block: `with use_backend("torch"): ...`.

    Blocks nest (the innermost wins) and win over env LIGHTNING_OPS_BACKEND. The choice is
    local to the calling thread and asyncio task (a contextvars.ContextVar): ops that other
    threads run meanwhile keep their own choice. A thread started inside the block does not
    inherit it (run it with contextvars.copy_context().run to pass it on). The backward of an
    op runs on the backend its forward ran on, wherever the backward is called. Compiled code
    reads the choice per thread (asyncio tasks that share a thread share it there)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar: the per-thread copy
        outer = _mirrored()
        _mirror.stack = outer + (name,)
        try:
            yield
        finally:
            _mirror.stack = outer
        return
    stack = _forced.get() + (name,)
    token = _forced.set(stack)
    outer, _mirror.stack = _mirrored(), stack
    try:
        yield
    finally:
        _forced.reset(token)
        _mirror.stack = outer


def resolve(family: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs `family` on `device` for inputs of `dtype`. Unforced, float64 runs
    on torch everywhere: the kernels compute in fp32 and would quietly lose the precision."""
    forced = requested()
    if forced is None and device.type != "cuda":  # the common CPU call: nothing to check
        return "torch"
    if forced is not None:
        why = missing(forced, device, family)
        if why is not None:
            raise BackendUnavailableError(f"backend {forced!r} is unavailable: {why}")
        return forced
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"
    for name in _FAMILY_BACKENDS[family]:
        if missing(name, device, family) is None and _loadable(family, name):
            return name
    return "torch"


_load_errors: Dict[Tuple[str, str], str] = {}


def _loadable(family: str, backend: str) -> bool:
    try:
        implementation(family, backend)
        return True
    except BackendUnavailableError:
        return False


def implementation(family: str, backend: str):
    """The module implementing `family` on `backend` (imported lazily)."""
    key = (family, backend)
    mod = sys.modules.get(_MODULES.get(key, ""))  # loaded already: what import_module returns
    if mod is not None:
        return mod
    if key in _load_errors:
        raise BackendUnavailableError(_load_errors[key])
    try:
        return importlib.import_module(_MODULES[key])
    except BackendUnavailableError as e:  # e.g. csrc cannot be built here: remember why
        _load_errors[key] = str(e)
        raise
    except ImportError as e:
        _load_errors[key] = f"backend {backend!r} for {family} ops failed to load: {e}"
        raise BackendUnavailableError(_load_errors[key]) from e
