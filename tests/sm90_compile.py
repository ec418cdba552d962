"""The sm_90 compile checks' one harness: Triton kernels compiled for an H100 / H200 target
(GPUTarget("cuda", 90, 32): frontend, LLVM and ptxas; no GPU needed) in a clean subprocess.
TRITON_INTERPRET=1 (`make test` sets it) runs code the compiler rejects and ignores the
shared-memory limit, so the compile runs in a process without it.

A test module lists its configurations in a function that calls `build` once per kernel
configuration, and its test calls `compile_in_subprocess(__file__, "<that function>", count)`:

    def _sm90_configs():
        build(K.some_kernel, dict(q="*bf16"), dict(H=4, K=128, GATE=VECTOR_GATE), "name")

    def test_compile_for_sm90():
        compile_in_subprocess(__file__, "_sm90_configs", 1)

tests/core/test_sm90_resources.py (tools/sm90_resources.py: every launch the launchers really
make) shares the clean environment and the ptxas check."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, Mapping, Optional

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# bytes of shared memory one block may use on sm_90 (= lightning_ops.triton_utils.SM90_SHARED_LIMIT)
SM90_SHARED_LIMIT = 232448
# argument types the kernels' pointer and scalar arguments default to in `build`
POINTER_DEFAULT = "*fp32"


def ptxas_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def skip_without_ptxas() -> None:
    if not os.path.exists(ptxas_path()):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")


def clean_env(**extra: str) -> Dict[str, str]:
    """This process's environment without TRITON_INTERPRET, the repository root on PYTHONPATH,
    plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def build(fn, types: Mapping[str, str], consts: Mapping[str, object], name: Optional[str] = None,
          num_warps: int = 4) -> int:
    """Compile the @triton.jit kernel `fn` for sm_90: `consts` are its constexprs (gate kinds as
    the named constants of lightning_ops.chunk.constants), `types` the Triton types of the
    other arguments by name (the rest "*fp32"). Asserts the shared memory fits, prints
    'ok <name> <shared bytes>' and returns the bytes. Call it only in the subprocess."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name = name or fn.__name__
    sig = {p: "constexpr" if p in consts else types.get(p, POINTER_DEFAULT) for p in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    shared = k.metadata.shared
    assert shared <= SM90_SHARED_LIMIT, f"{name}: {shared} B of shared memory"
    print("ok", name, shared, flush=True)
    return shared


def compile_in_subprocess(test_file: str, configs: str, count: int, timeout: float = 900) -> str:
    """Run `configs()` of the test module `test_file` (a function calling `build` per kernel) in
    a subprocess without TRITON_INTERPRET, with tests/ and the module's folder importable; skip
    without ptxas. Asserts it exits cleanly having compiled `count` kernels; returns its
    stdout."""
    skip_without_ptxas()
    here = os.path.dirname(os.path.abspath(test_file))
    module = os.path.splitext(os.path.basename(test_file))[0]
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {TESTS!r}, {here!r}]; "
            f"import {module} as m; m.{configs}()")
    r = subprocess.run([sys.executable, "-c", code], env=clean_env(TRITON_DEFAULT_FP_FUSION="1"),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("ok ") == count, r.stdout
    return r.stdout
