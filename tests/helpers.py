"""Shared test utilities: tolerances, NaN-filled outputs, random inputs with safe gates."""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

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


def grads_of(loss: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]):
    ins = [t for t in tensors if t is not None and t.requires_grad]
    got = torch.autograd.grad(loss, ins, allow_unused=True)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in tensors]
