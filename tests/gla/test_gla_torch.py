"""The chunked torch engine of the GLA family (lightning_ops/chunk/torch.py) through the public API,
against the reference recurrence in float64 (<= 1e-10 relative): output, final state and the
gradients of q, k, v, g and initial_state from one (o*do).sum() + (ht*dht).sum() backward."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lightning_ops as lo
from gla_cases import OPS, RESULT_NAMES, flat, make_inputs, reference_run, run, run_op, with_grad
from helpers import assert_close, cu_seqlens_from_lengths, nan_filled_empty, rel_rms
from lightning_ops.chunk import torch as engine

TOL = 1e-10
F64 = torch.float64


def inputs(op, B, T, H, K, V, lengths=None, h0=True, dtype=F64, seed=0, gate_low=-1.0,
           grad=True):
    """This file's inputs: float64 by default, log decays in (gate_low, 0), g_gamma in
    (-0.51, -0.01); leaves that take gradients unless grad=False."""
    x = make_inputs(op, B, T, H, K, V, lengths=lengths, h0=h0, low=gate_low, gamma=(0.01, 0.5),
                    dtype=dtype, seed=seed)
    return with_grad(x) if grad else x


def check_against_reference(op, mode, B, T, H, K, V, lengths=None, scale=None, h0=True,
                            output_final_state=True, **gen):
    x = inputs(op, B, T, H, K, V, lengths=lengths, h0=h0, **gen)
    kw = dict(scale=scale, output_final_state=output_final_state)
    with lo.use_backend("torch"):
        got = flat(run(x, lambda t: run_op(op, mode, t, **kw)))
    want = flat(reference_run(x, **kw))
    for name, a, e in zip(RESULT_NAMES, got, want):
        assert_close(f"{op}/{mode} {name}", a, e, TOL)
    return got


# ------------------------------------------------------------------------------------------------
# Every op, both modes, on one ragged shape (T=100: a full chunk + 36, K != V, K not a power of 2)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", list(OPS))
def test_op_matches_reference(name, mode, monkeypatch):
    nan_filled_empty(monkeypatch)
    check_against_reference(name, mode, B=2, T=100, H=2, K=48, V=32)


@pytest.mark.parametrize("name", ["linear", "simple_both", "gla"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_short_sequences(name, mode, T, monkeypatch):
    """Decode-like lengths: the chunk shrinks to the sequence (C = 1 at T = 1)."""
    nan_filled_empty(monkeypatch)
    check_against_reference(name, mode, B=2, T=T, H=2, K=16, V=24)


# ------------------------------------------------------------------------------------------------
# Odd shapes (DESIGN.md): T=1, T < chunk, ragged T, B=H=1, K != V, K, V in {16..512} and non-pow2
# ------------------------------------------------------------------------------------------------
SHAPES = [  # B, T, H, K, V
    (1, 1, 1, 16, 16),
    (2, 37, 3, 32, 64),
    (1, 64, 1, 64, 16),
    (1, 90, 2, 100, 48),
    (2, 140, 1, 16, 32),
    (1, 70, 2, 128, 16),
    (1, 12, 1, 256, 256),
    (1, 9, 1, 512, 20),  # K up to validation.MAX_GLA_KEY_DIM
]


@pytest.mark.parametrize("name", ["simple_both", "gla"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
def test_odd_shapes(name, shape, monkeypatch):
    nan_filled_empty(monkeypatch)
    check_against_reference(name, "chunk", *shape)


@pytest.mark.parametrize("name", ["linear", "simple_g", "gla"])
@pytest.mark.parametrize("scale, h0, final", [(0.37, True, True), (None, False, True),
                                               (2.0, True, False), (None, False, False)])
def test_scale_and_state_options(name, scale, h0, final, monkeypatch):
    nan_filled_empty(monkeypatch)
    got = check_against_reference(name, "chunk", B=1, T=70, H=2, K=16, V=32,
                                  scale=scale, h0=h0, output_final_state=final)
    assert (got[1] is None) == (not final)
    assert (got[-1] is None) == (not h0)


# ------------------------------------------------------------------------------------------------
# Varlen: a pack equals the reference with cu_seqlens and equals separate runs per segment
# ------------------------------------------------------------------------------------------------
LENGTHS = [1, 0, 40, 5, 64, 70, 1]


@pytest.mark.parametrize("name, mode", [(n, "chunk") for n in OPS]
                         + [("simple_both", "recurrent"), ("gla", "recurrent")])
def test_varlen_matches_reference_and_separate_runs(name, mode, monkeypatch):
    nan_filled_empty(monkeypatch)
    packed = check_against_reference(name, mode, B=1, T=sum(LENGTHS), H=2, K=16, V=32,
                                     lengths=LENGTHS)

    # the same inputs run one segment at a time, stitched back together
    x = inputs(name, 1, sum(LENGTHS), 2, 16, 32, lengths=LENGTHS)
    q, k, v, g, h, cu = x["q"], x["k"], x["v"], x["g"], x["h0"], x["cu"]
    os_, hts = [], []
    with lo.use_backend("torch"):
        for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            if s == e:  # an empty segment passes its initial state through
                hts.append(h[n])
                continue
            o, ht = OPS[name](mode, q[:, s:e], k[:, s:e], v[:, s:e],
                              None if g is None else g[:, s:e], x["gamma"],
                              initial_state=h[n:n + 1], output_final_state=True)
            os_.append(o)
            hts.append(ht[0])
    sep = flat(run(x, lambda _: (torch.cat(os_, 1), torch.stack(hts))))
    for nm, a, e in zip(RESULT_NAMES, packed, sep):
        assert_close(f"{name}/{mode} packed vs separate {nm}", a, e, TOL)


@pytest.mark.parametrize("name", ["simple_g", "gla"])
def test_varlen_all_length_one(name, monkeypatch):
    """Decode of N sequences packed one token each (chunk size 1)."""
    nan_filled_empty(monkeypatch)
    check_against_reference(name, "recurrent", B=1, T=6, H=2, K=16, V=16, lengths=[1] * 6)


# ------------------------------------------------------------------------------------------------
# Numerics: strong gates, dtypes, determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["simple_both", "gla"])
def test_strong_gates_finite_and_exact(name, monkeypatch):
    """Down to -20 per token: chunk-local cumulative decays reach -1280 (fp32 part), so any
    exp(-b) would overflow."""
    nan_filled_empty(monkeypatch)
    check_against_reference(name, "chunk", B=1, T=130, H=2, K=16, V=16, gate_low=-20.0)
    x = inputs(name, 1, 300, 2, 16, 16, dtype=torch.float32)
    with torch.no_grad():
        x["g"].fill_(-20.0)
    with lo.use_backend("torch"):
        got = flat(run(x, lambda t: run_op(name, "chunk", t, output_final_state=True)))
    for name_, t in zip(RESULT_NAMES, got):
        assert torch.isfinite(t).all(), f"{name_} is not finite under -20 gates in fp32"


@pytest.mark.parametrize("name", ["simple_both", "gla"])
@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.float16)])
def test_dtypes(name, dtype, state_dtype, monkeypatch):
    """o in v's dtype, final state fp32, every gradient in its input's dtype; values close to the
    float64 reference run on the same (rounded) inputs."""
    nan_filled_empty(monkeypatch)
    x = inputs(name, 2, 80, 2, 32, 16, h0=False, dtype=dtype, grad=False)
    x["h0"] = torch.randn(2, 2, 32, 16).to(state_dtype)
    x = with_grad(x)
    with lo.use_backend("torch"):
        got = flat(run(x, lambda t: run_op(name, "chunk", t, output_final_state=True)))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for t, n in zip(got[2:], ["q", "k", "v", "g", "h0"]):
        if x[n] is not None:
            assert t.dtype == x[n].dtype and t.shape == x[n].shape
    want = flat(reference_run(x))
    # each result is compared at the precision of its own dtype (fp32 math inside)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    for nm, a, e in zip(RESULT_NAMES, got, want):
        assert_close(f"{name} {dtype} {nm}", a, e, None if a is None else tol[a.dtype],
                     metric=rel_rms)


def test_deterministic():
    x = inputs("gla", 1, 150, 2, 16, 16, dtype=torch.float32)
    runs = []
    for _ in range(2):
        with lo.use_backend("torch"):
            runs.append(flat(run(x, lambda t: lo.chunk_gla(t["q"], t["k"], t["v"], t["g"],
                                                           initial_state=t["h0"],
                                                           output_final_state=True))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Memory: no T x T tensor anywhere in forward or backward
# ------------------------------------------------------------------------------------------------
class _SquareOfT(TorchDispatchMode):
    """Records every op output with two or more dims of at least T elements."""

    def __init__(self, T):
        super().__init__()
        self.T, self.hits = T, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and sum(s >= self.T for s in t.shape) >= 2:
                self.hits.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("name", ["linear", "simple_both", "gla"])
@pytest.mark.parametrize("varlen", [False, True])
def test_no_T_by_T_tensor(name, varlen):
    T = 200  # no other dim (H=2, K=16, V=24, C=64, chunk count <= 6) reaches it
    x = inputs(name, 1, T, 2, 16, 24, lengths=[150, 50] if varlen else None,
               dtype=torch.float32, grad=False)
    cu, h = x["cu"], x["h0"]
    args = [x[n] for n in ("q", "k", "v", "g", "gamma")]
    # the detector itself must fire on attention-style scores
    with _SquareOfT(T) as probe:
        args[0][0, :, 0] @ args[1][0, :, 0].T
    assert probe.hits
    with _SquareOfT(T) as probe:
        o, ht = engine.forward(*args, 0.25, h.detach(), True, cu, "chunk")
        engine.backward(*args, 0.25, h.detach(), cu, "chunk", torch.ones_like(o),
                        torch.ones_like(ht))
    assert not probe.hits, f"T x T intermediates: {probe.hits[:3]}"


def test_layout_pack_unpack_roundtrip():
    """ChunkLayout (reused by the other engines): every token lands in exactly one slot, padding
    is zero, and the sequences still running at each step are a prefix."""
    lengths = [3, 0, 9, 1, 4]
    cu = cu_seqlens_from_lengths(lengths)
    layout = engine.ChunkLayout.build(1, sum(lengths), cu, 4, "cpu")
    x = torch.randn(1, sum(lengths), 2, 5)
    packed = layout.pack(x, torch.float64)
    assert packed.shape == (layout.NC, 2, 4, 5)
    assert torch.equal(layout.unpack(packed, torch.float32), x)
    assert packed.abs().sum(-1).ne(0).sum() == x.numel() // 5  # padding slots stay zero
    # chunk counts 1, 0, 3, 1, 1 -> stream ranks: the 3-chunk sequence first, the empty one last
    assert layout.steps == [(0, 4), (4, 1), (5, 1)]
    assert layout.valid.sum() == sum(lengths)
