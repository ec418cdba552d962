"""Shared test utilities: tolerances (the low-precision rule included), NaN-filled outputs,
random inputs with safe gates, leaf copies and one probe backward. Importable as `helpers`
(pyproject.toml puts tests/ on the path); the sm_90 compile harness is tests/sm90_compile.py."""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional, Sequence

import pytest
import torch

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET),
    reason="Triton needs a GPU or TRITON_INTERPRET=1 (make test sets it)")


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (0 for two empty tensors)."""
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e||_2 / ||e||_2, the relative RMS error."""
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return 0.0
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(name: str, actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
                 tol: float, metric=rel_err) -> None:
    assert (actual is None) == (expected is None), f"{name}: one side is None"
    if actual is None:
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = metric(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


# The low-precision rule: where no fixed tolerance fits a bf16 / fp16 result, its error against
# the float64 truth must stay within LOWP_FACTOR x the error plain PyTorch makes on the same
# low-precision inputs against the same truth ("within 2x of PyTorch's own low-precision error").
LOWP_FACTOR = 2.0


def lowp_bound(base_err: float, tol: float = 0.0, floor: float = 0.0) -> float:
    """The error a low-precision result may have: LOWP_FACTOR x base_err (PyTorch's own error
    in that dtype, against the same reference) plus an absolute floor (for baselines near 0),
    and never less than tol."""
    return max(tol, LOWP_FACTOR * base_err + floor)


def assert_lowp_parity(ours: Mapping[str, float], base: Mapping[str, float], *,
                       tol: float = 0.0, floor: float = 0.0, what: str = "") -> None:
    """Every error in ours (by name) within lowp_bound of the baseline error of that name."""
    bad = {n: (e, base[n]) for n, e in ours.items() if e > lowp_bound(base[n], tol, floor)}
    assert not bad, f"{what}: (ours, plain PyTorch) over {LOWP_FACTOR:g}x: {bad}"


def nan_filled_empty(monkeypatch) -> None:
    """Make torch.empty / empty_like / new_empty return NaN-filled float tensors for the rest of
    the test, so outputs a kernel forgets to write fail the comparison (fla's trick)."""
    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def _fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _fill(real_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **kw: _fill(real_new(self, *a, **kw)))


def log_gate(*shape, low: float = -0.5, dtype=torch.float64, device="cpu",
             generator=None) -> torch.Tensor:
    """Random log-decays in (low, 0): logsigmoid-like gates as models produce them."""
    u = torch.rand(*shape, dtype=dtype, device=device, generator=generator)
    return low * u


def cu_seqlens_from_lengths(lengths: Sequence[int], device="cpu") -> torch.Tensor:
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def backward_probe(outputs: Iterable[Optional[torch.Tensor]], seed: int = 1):
    """One scalar (o*do).sum() + (ht*dht).sum() with fixed random cotangents."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for out in outputs:
        if out is None:
            continue
        w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
        total = total + (out * w).sum()
    return total


def leaf_copies(tensors: Sequence[Optional[torch.Tensor]]):
    """Detached clones that take gradients (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def grads_of(loss: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]):
    ins = [t for t in tensors if t is not None and t.requires_grad]
    got = torch.autograd.grad(loss, ins, allow_unused=True)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in tensors]
