"""selective_scan_fn (Mamba-1) against reference.selective_scan_ref: y, last state and every
gradient, on every backend (the CUDA kernel's own tests are in test_ssm_cuda.py)."""
import pytest
import torch

from helpers import rel_rms, requires_triton, triton_device
from lightning_ops import reference
from lightning_ops.ssm.ops import selective_scan_fn
from ssm_cases import as_ref, cfg, check_parity, scan_inputs  # noqa: F401  (cfg: fixture)

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize("b, d, n, L, groups, full", [
    (1, 1, 1, 1, None, False),       # T = 1, B = D = 1
    (2, 4, 3, 1, 2, True),
    (1, 6, 5, 63, 3, True),          # grouped B/C, odd length
    (2, 3, 16, 300, None, True),     # not a multiple of the chunk
    (1, 2, 4, 300, None, False),
    (1, 4, 2, 130, 1, True),         # G = 1 in the 4-dim form
    (1, 4, 40, 9, 1, True),          # N > 16: fewer channels per Triton program (BD = 2)
])
def test_selective_scan_parity(cfg, b, d, n, L, groups, full):
    backend, dtype, device, tol, metric = cfg
    if backend == "triton" and device == "cpu" and b * d * n * L > 3000:
        # the interpreter runs tl.associative_scan element by element (~1 ms each)
        pytest.skip("too big for the Triton interpreter; run on the torch backend and GPUs")
    inp = scan_inputs(b, d, n, L, groups, D=full, z=full, bias=full, dtype=dtype,
                      device=device, seed=L + d)
    ref_in = as_ref(inp)
    y, last = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=full,
                                return_last_state=True)
    y_ref, last_ref = reference.selective_scan_ref(*[ref_in[k] for k in ARGS],
                                                   delta_softplus=full, return_last_state=True)
    assert y.dtype == dtype and last.dtype == (torch.float64 if dtype == torch.float64
                                               else torch.float32)
    check_parity(("y", "last_state"), (y, last), (y_ref, last_ref), inp, ref_in, tol, metric)


def test_selective_scan_y_only(cfg):
    """Without return_last_state the op returns y alone, and its gradients match."""
    backend, dtype, device, tol, metric = cfg
    inp = scan_inputs(2, 4, 3, 37, None, dtype=dtype, device=device, seed=3)
    ref_in = as_ref(inp)
    y = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True)
    y_ref = reference.selective_scan_ref(*[ref_in[k] for k in ARGS], delta_softplus=True)
    assert isinstance(y, torch.Tensor)
    check_parity(("y",), (y,), (y_ref,), inp, ref_in, tol, metric)


def test_selective_scan_empty_length(cfg):
    """L = 0: empty y, zero last state, and a backward that runs (it used to fail on the torch
    path: the recomputed last state was a fresh zeros tensor off the graph) with zero grads."""
    backend, dtype, device, tol, metric = cfg
    inp = scan_inputs(2, 4, 3, 0, 2, dtype=dtype, device=device, seed=1)
    y, last = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True,
                                return_last_state=True)
    assert y.shape == (2, 4, 0) and last.shape == (2, 4, 3)
    assert torch.equal(last, torch.zeros_like(last))
    (y.sum() + (last * torch.ones_like(last)).sum()).backward()
    for k in ARGS:
        g = inp[k].grad
        assert g is not None and g.shape == inp[k].shape and not g.any(), k


def test_selective_scan_strong_decay_finite():
    """Gates near -20 per token over a long sequence: finite outputs and gradients."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 4096, generator=g, requires_grad=True)
    delta = torch.full((1, 2, 4096), 20.0, requires_grad=True)
    A = torch.full((2, 4), -1.0, requires_grad=True)
    B, C = torch.randn(1, 4, 4096, generator=g), torch.randn(1, 4, 4096, generator=g)
    y, last = selective_scan_fn(u, delta, A, B, C, return_last_state=True)
    (y.sum() + last.sum()).backward()
    for t in (y, last, u.grad, delta.grad, A.grad):
        assert torch.isfinite(t).all()


def test_selective_scan_low_precision_cpu():
    """bf16 inputs on the torch path: fp32 math, bf16 output close to the fp64 reference."""
    inp = scan_inputs(1, 4, 8, 100, None, dtype=torch.bfloat16, seed=5)
    ref_in = as_ref(inp)
    y = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True)
    y_ref = reference.selective_scan_ref(*[ref_in[k] for k in ARGS], delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert (y.double() - y_ref).norm() / y_ref.norm() < 1e-2


@pytest.mark.parametrize("bad, match", [
    (dict(u=torch.zeros(2, 4)), "u must have shape"),
    (dict(delta=torch.zeros(2, 4, 5)), "delta must have shape"),
    (dict(A=torch.zeros(3, 3)), "A must have shape"),
    (dict(B=torch.zeros(2, 3, 3, 7)), "groups"),
    (dict(C=torch.zeros(2, 4, 7)), "C must have B's shape"),
    (dict(D=torch.zeros(5)), "D must have shape"),
    (dict(delta_bias=torch.zeros(4, 1)), "delta_bias must have shape"),
    (dict(u=torch.zeros(2, 4, 7, dtype=torch.int32)), "u must be float"),
])
def test_selective_scan_validation(bad, match):
    args = dict(u=torch.zeros(2, 4, 7), delta=torch.zeros(2, 4, 7), A=torch.zeros(4, 3),
                B=torch.zeros(2, 3, 7), C=torch.zeros(2, 3, 7), D=None, delta_bias=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan_fn(**args)


@requires_triton
def test_triton_scan_tile_shrinks_with_the_state():
    """[BD, BN, TC] stays at 8 x 16 x 32 elements: BD 8 at N <= 16, 1 at N >= 128 (and never
    more than the group's channels allow)."""
    from lightning_ops.ssm import triton as S
    assert [S._scan_block(64, n) for n in (1, 16, 17, 32, 64, 128, 256)] == [8, 8, 4, 4, 2, 1, 1]
    assert S._scan_block(6, 16) == 2 and S._scan_block(3, 16) == 1


@requires_triton
@pytest.mark.parametrize("cap", [None, 1], ids=["one-partial-per-block", "capped"])
def test_triton_scan_partial_buffers_bounded(monkeypatch, cap):
    """The Triton backward sums dB / dC over channel blocks in bounded partial buffers: with
    PARTIAL_CAP_BYTES forcing several blocks into one partial row (read back and added in the
    kernel), the gradients still match the float64 reference."""
    import lightning_ops as lo
    from lightning_ops.ssm import triton as S
    if cap is not None:
        monkeypatch.setattr(S, "PARTIAL_CAP_BYTES", cap)
    b, d, n, L, G = 1, 32, 2, 33, 2       # 16 channels per group: two blocks of 8
    assert S._blocks_per_partial(b, d // S._scan_block(d // G, n), G, n, L) == (1 if cap is None
                                                                           else 2)
    inp = scan_inputs(b, d, n, L, G, dtype=torch.float32, device=triton_device(), seed=7)
    ref_in = as_ref(inp)
    with lo.use_backend("triton"):
        y, last = selective_scan_fn(*[inp[k] for k in ARGS], delta_softplus=True,
                                    return_last_state=True)
    y_ref, last_ref = reference.selective_scan_ref(*[ref_in[k] for k in ARGS],
                                                   delta_softplus=True, return_last_state=True)
    check_parity(("y", "last_state"), (y, last), (y_ref, last_ref), inp, ref_in, 1e-5, rel_rms)
