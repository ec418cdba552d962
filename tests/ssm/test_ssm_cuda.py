"""The hand-written CUDA selective scan (csrc/): a compile check of every csrc/*.cu for sm_80 and
sm_90 on any machine with nvcc, and GPU parity / determinism / >2^31-element tests."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import rel_rms, requires_gpu
from lightning_ops import reference
from lightning_ops.backend import use_backend
from lightning_ops.ssm.ops import selective_scan_fn
from ssm_cases import as_ref, check_parity, scan_inputs

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_csrc_compiles_for_sm80_sm90(source, tmp_path):
    """Compile only (no link, no GPU): catches CUDA syntax and template errors in CI."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine): compile check skipped")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    cmd = [nvcc, "-c", str(CSRC / source), "-o", str(tmp_path / "out.o"), "-std=c++20", "-O3",
           f"-I{CSRC}", *[f"-I{p}" for p in include_paths()], *COMMON_NVCC_FLAGS,
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed on {source}:\n{res.stderr[-4000:]}"


def test_cuda_backend_unavailable_is_clear():
    """Without a GPU (or nvcc) asking for the cuda backend says what is missing."""
    if torch.cuda.is_available() and _nvcc() is not None:
        pytest.skip("a GPU and nvcc are present: the backend is available")
    from lightning_ops.backend import BackendUnavailableError
    inp = scan_inputs(1, 2, 2, 4, None, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        with use_backend("cuda"):
            selective_scan_fn(*[inp[k] for k in ARGS])


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("b, d, n, L, groups", [
    (1, 1, 1, 1, None), (2, 4, 16, 300, 2), (1, 3, 5, 2500, None), (2, 8, 16, 1025, 4)])
def test_cuda_scan_parity_fp32(b, d, n, L, groups):
    inp = scan_inputs(b, d, n, L, groups, dtype=torch.float32, device="cuda", seed=L)
    ref_in = as_ref(inp)
    with use_backend("cuda"):
        y, last = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True,
                                    return_last_state=True)
    y_ref, last_ref = reference.selective_scan_ref(*[ref_in[k] for k in ARGS],
                                                   delta_softplus=True, return_last_state=True)
    check_parity(("y", "last_state"), (y, last), (y_ref, last_ref), inp, ref_in, 2e-5, rel_rms)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_scan_low_precision(dtype):
    """Within 2x (+ a small floor) of the error of plain PyTorch on the same low-precision
    inputs (the reference run on them) against the float64 reference."""
    inp = scan_inputs(2, 8, 16, 700, 2, dtype=dtype, device="cuda", seed=1)
    ref_in = as_ref(inp)
    base_in = {k: None if v is None else v.detach().clone().requires_grad_()
               for k, v in inp.items()}
    with use_backend("cuda"):
        y, last = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True,
                                    return_last_state=True)
    y_ref, last_ref = reference.selective_scan_ref(*[ref_in[k] for k in ARGS],
                                                   delta_softplus=True, return_last_state=True)
    y_b, last_b = reference.selective_scan_ref(*[base_in[k] for k in ARGS],
                                               delta_softplus=True, return_last_state=True)
    for name, ours, base, ref in (("y", y, y_b, y_ref), ("last", last, last_b, last_ref)):
        e_ours, e_base = rel_rms(ours.cpu(), ref), rel_rms(base.cpu(), ref)
        assert e_ours <= 2 * e_base + 1e-3, f"{name}: {e_ours:.2e} vs PyTorch {e_base:.2e}"
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    names = list(ARGS)
    ours = torch.autograd.grad((y.double() * dy.cuda()).sum(), [inp[k] for k in names])
    refs = torch.autograd.grad((y_ref * dy).sum(), [ref_in[k] for k in names])
    base = torch.autograd.grad((y_b.double() * dy.cuda()).sum(), [base_in[k] for k in names])
    for name, o, r, bb in zip(names, ours, refs, base):
        e_ours, e_base = rel_rms(o.cpu(), r), rel_rms(bb.cpu(), r)
        assert e_ours <= 2 * e_base + 1e-3, f"d{name}: {e_ours:.2e} vs PyTorch {e_base:.2e}"


@pytest.mark.gpu
@requires_gpu
def test_cuda_scan_deterministic():
    inp = scan_inputs(2, 16, 16, 3000, 1, dtype=torch.float32, device="cuda", seed=3)
    outs = []
    for _ in range(2):
        with use_backend("cuda"):
            y, last = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True,
                                        return_last_state=True)
        outs.append((y, last) + torch.autograd.grad((y * y).sum() + last.sum(),
                                                    [inp[k] for k in ARGS]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@requires_gpu
def test_cuda_scan_past_2pow31_elements():
    """B*D*L > 2^31 (where 32-bit offsets wrap): strong decay makes the last tokens depend
    only on a short window, which the torch backend checks (forward and backward)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 60 * 2**30:
        pytest.skip(f"needs ~60 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    b, d, n, W = 2, 8, 2, 256
    L = 2**31 // (b * d) + 4099  # B*D*L > 2^31
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    u = torch.randn(b, d, L, device=dev, dtype=dt, generator=g).requires_grad_()
    delta = torch.full((b, d, L), 10.0, device=dev, dtype=dt, requires_grad=True)
    A = torch.full((d, n), -2.0, device=dev, requires_grad=True)  # decay e^-20 per token
    B = torch.randn(b, n, L, device=dev, dtype=dt, generator=g).requires_grad_()
    C = torch.randn(b, n, L, device=dev, dtype=dt, generator=g).requires_grad_()
    dy = torch.randn(b, d, L, device=dev, dtype=dt, generator=g)
    with use_backend("cuda"):
        y, last = selective_scan_fn(u, delta, A, B, C, return_last_state=True)
    du, ddelta, dB, dC = torch.autograd.grad(y, [u, delta, B, C], dy)
    win = slice(L - W, L)
    wu, wdelta, wB, wC = (t.detach()[..., win].float().requires_grad_()
                          for t in (u, delta, B, C))
    with use_backend("torch"):
        y_w, last_w = selective_scan_fn(wu, wdelta, A.detach(), wB, wC, return_last_state=True)
    g_w = torch.autograd.grad(y_w, [wu, wdelta, wB, wC], dy[..., win].float())
    tail = slice(W // 2, W)  # away from the window's cut-off start
    assert rel_rms(y[..., win][..., tail].float(), y_w[..., tail]) < 2e-2
    assert rel_rms(last, last_w) < 2e-2
    for got, want in zip((du, ddelta, dB, dC), g_w):
        assert rel_rms(got[..., win][..., tail].float(), want[..., tail]) < 2e-2
