"""Backend choice: device default, env override, context manager, clear unavailability errors."""
import pytest
import torch

import lightning_ops as lo
from lightning_ops import backend


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv("LIGHTNING_OPS_BACKEND", raising=False)
    assert backend.resolve("gla", torch.device("cpu")) == "torch"


def test_env_override(monkeypatch):
    monkeypatch.setenv("LIGHTNING_OPS_BACKEND", "cuda")
    with pytest.raises(lo.BackendUnavailableError, match="cuda backend needs CUDA tensors"):
        backend.resolve("selective_scan", torch.device("cpu"))


def test_context_manager_wins_over_env_and_nests(monkeypatch):
    monkeypatch.setenv("LIGHTNING_OPS_BACKEND", "cuda")
    with lo.use_backend("torch"):
        assert backend.resolve("gla", torch.device("cpu")) == "torch"
        with lo.use_backend("cuda"):
            assert backend.requested() == "cuda"
        assert backend.requested() == "torch"
    assert backend.requested() == "cuda"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with lo.use_backend("tpu"):
            pass


def test_family_without_backend_is_named():
    with lo.use_backend("cuda"):
        with pytest.raises(lo.BackendUnavailableError, match="gla ops have no cuda backend"):
            backend.resolve("gla", torch.device("cpu"))


def test_unavailable_backend_raises_from_op():
    q = torch.randn(1, 4, 1, 8)
    with lo.use_backend("cuda"), pytest.raises(lo.BackendUnavailableError, match="unavailable"):
        lo.chunk_linear_attn(q, q, q)


def test_triton_needs_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = backend.missing("triton", torch.device("cpu"), "gla")
    if not torch.cuda.is_available():
        assert why is not None and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.missing("triton", torch.device("cpu"), "gla") is None


def test_float64_defaults_to_torch_even_on_cuda(monkeypatch):
    """Kernels compute in fp32; unforced float64 must not be routed to them."""
    monkeypatch.delenv("LIGHTNING_OPS_BACKEND", raising=False)
    assert backend.resolve("gla", torch.device("cuda"), torch.float64) == "torch"
