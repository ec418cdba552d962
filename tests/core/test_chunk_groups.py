"""The torch chunk engines walk the chunk stream a group of chunks at a time
(chunk/constants.py's GROUP_BYTES): the grouping must change no bit. Every GLA-family and delta-rule
case runs with groups of 1 and 3 chunks and as one group, and the outputs, final states and
every gradient must be identical (torch.equal); outputs start NaN-filled, so a token no group
writes fails. Varlen layouts (sequences ending in different groups), grouped value heads, the l2
norm, KDA's vector gates and lower precision are covered."""
import pytest
import torch

import lightning_ops as lo
from delta.delta_cases import CASES as DELTA_CASES, KDA_CASES, make_inputs as delta_inputs
from delta.delta_cases import outputs_and_grads, run_op as delta_run
from gla.gla_cases import OPS, flat, make_inputs as gla_inputs, run, run_op as gla_run, with_grad
from helpers import nan_filled_empty
from lightning_ops.chunk import torch as chunk_torch
from lightning_ops.delta import torch as delta_torch

GLA_CASES = [  # (op, B, T, H, K, V, lengths)
    ("linear", 2, 200, 2, 16, 8, None),
    ("simple_g", 1, 300, 2, 8, 16, None),
    ("simple_both", 2, 150, 2, 8, 8, None),
    ("lightning", 1, 270, 2, 8, 8, None),
    ("gla", 2, 200, 2, 16, 8, None),
    ("simple_g", 1, 330, 2, 8, 8, [70, 1, 0, 130, 129]),
    ("gla", 1, 330, 2, 8, 8, [200, 1, 65, 64]),
    ("simple_gamma", 1, 300, 2, 8, 8, [64, 64, 172]),
]


def _grouped(monkeypatch, chunks):
    """Groups of `chunks` chunks (None: the whole stream as one group)."""
    n = (lambda *a: 1 << 40) if chunks is None else (lambda *a: chunks)
    monkeypatch.setattr(chunk_torch, "group_chunks", n)
    monkeypatch.setattr(delta_torch, "group_chunks", n)


def _same(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, i
            assert torch.equal(a, b), (i, (a - b).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GLA_CASES, ids=lambda c: f"{c[0]}-B{c[1]}T{c[2]}"
                         + ("-var" if c[6] else ""))
def test_gla_groups_change_no_bit(case, dtype, monkeypatch):
    op, B, T, H, K, V, lengths = case
    x = gla_inputs(op, B, T, H, K, V, lengths=lengths, dtype=dtype, seed=5)
    nan_filled_empty(monkeypatch)
    results = []
    for chunks in (None, 1, 3):
        _grouped(monkeypatch, chunks)
        with lo.use_backend("torch"):
            xg = with_grad(x)
            results.append(flat(run(xg, lambda r: gla_run(op, "chunk", r,
                                                          output_final_state=True))))
    _same(results[1], results[0])
    _same(results[2], results[0])


@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [c for c in DELTA_CASES + KDA_CASES if c.T > 32],
                         ids=lambda c: c.id)
def test_delta_groups_change_no_bit(case, dtype, chunk, monkeypatch):
    monkeypatch.setattr(delta_torch, "TORCH_CHUNK", chunk)
    inputs, cu = delta_inputs(case, dtype=dtype, seed=2)
    nan_filled_empty(monkeypatch)
    results = []
    for chunks in (None, 1, 3):
        _grouped(monkeypatch, chunks)
        with lo.use_backend("torch"):
            results.append(list(outputs_and_grads(*delta_run(case, inputs, cu)).values()))
    _same(results[1], results[0])
    _same(results[2], results[0])


def test_groups_are_consecutive_steps():
    """ChunkLayout.groups covers every step once, in order, within the chunk budget (one step
    at least), and its stream slices tile the stream."""
    cu = torch.tensor([0, 70, 71, 71, 201, 330])
    layout = chunk_torch.ChunkLayout.build(1, 330, cu, 64, "cpu")
    for chunks in (1, 2, 3, 5, 100):
        groups = layout.groups(chunks)
        assert groups[0].j0 == 0 and groups[-1].j1 == len(layout.steps)
        assert groups[0].s0 == 0 and groups[-1].s1 == layout.NC
        for a, b in zip(groups, groups[1:]):
            assert a.j1 == b.j0 and a.s1 == b.s0
        for grp in groups:
            assert grp.s1 - grp.s0 <= chunks or grp.j1 - grp.j0 == 1
