"""Context parallel log-linear attention (lightning_ops.cp.chunk_log_linear_attn and
chunk_log_linear_gated_delta_rule) on gloo CPU ranks: the output slice, the final states (ht and
the absolute offsets, summed over the ranks) and every gradient (q, k, v, g, level_scales, beta,
initial ht; summed over the ranks) equal the single-process public op on the whole sequence, in
float64 at 1e-10 relative.

The cases make the positions matter: user initial offsets that are not multiples of the chunk
(so pieces start mid-bucket and the incoming slots move and merge across levels), few levels L
(slots falling off the hierarchy) and many, small chunk sizes, grouped q/k heads, garbage in the
initial slots that do not exist at their offsets (the ops ignore them), varlen sequences
crossing and passing through ranks, one inside a rank, an empty one and length-1 pieces.

One spawn of 3 ranks runs both world sizes (the 2-rank cases on a subgroup): process start-up
dominates on a loaded 2-core machine."""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from cp_harness import _close, run_ranks, sum_over_ranks

import lightning_ops as lo
import lightning_ops.cp as cp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

F64 = torch.float64
TOL = 1e-10


def _inputs(op, B, T, N, L, G=1, H=2, K=4, V=3, max_off=40):
    """Full float64 inputs (requires_grad leaves, with their sequence dims) of one case."""
    logsig = torch.nn.functional.logsigmoid
    ins = {
        "q": (torch.randn(B, T, G, K, dtype=F64), 1),
        "k": (torch.nn.functional.normalize(torch.randn(B, T, G, K, dtype=F64), dim=-1), 1),
        "v": (torch.randn(B, T, H, V, dtype=F64), 1),
        "g": (logsig(torch.randn(B, T, H, dtype=F64)) * 0.5, 1),
        "lam": (torch.rand(B, T, H, L, dtype=F64) + 0.1, 1),
        "h0": (torch.randn(N, H, L, K, V, dtype=F64), None),
    }
    if op == "delta":
        ins["beta"] = (torch.rand(B, T, H, dtype=F64), 1)
    for t, _ in ins.values():
        t.requires_grad_(True)
    offsets = torch.randint(0, max_off, (N,), dtype=torch.int64)
    return ins, offsets


def _call(op, x, offsets, cu, ctx, chunk_size, l2, want=True):
    m = lo if ctx is None else cp
    kw = {} if ctx is None else {"cp_context": ctx}
    state = lo.LogLinearAttentionState(x["h0"], offsets)
    if op == "attn":
        return m.chunk_log_linear_attn(x["q"], x["k"], x["v"], x["g"], x["lam"], state, want,
                                       cu, scale=0.7, chunk_size=chunk_size, **kw)
    return m.chunk_log_linear_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["lam"], x["beta"], 0.7, state, want, cu, l2,
        chunk_size=chunk_size, **kw)


def check(rank, world, op, B, T, cu_list, L, chunk_size=64, bounds=None, G=1, l2=False,
          seed=0, group=None):
    torch.manual_seed(seed)
    cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32)
    N = B if cu is None else len(cu_list) - 1
    H = 2 * G
    ins, offsets = _inputs(op, B, T, N, L, G=G, H=H)
    full = {k_: t for k_, (t, _) in ins.items()}
    # the single-process op on the whole sequence (the default chunk size)
    o_ref, st_ref = _call(op, full, offsets, cu, None, 64, l2)
    torch.manual_seed(seed + 1)
    do, dht = torch.randn_like(o_ref), torch.randn_like(st_ref.ht)
    leaves = [t for t, _ in ins.values()]
    g_ref = torch.autograd.grad((o_ref * do).sum() + (st_ref.ht * dht).sum(), leaves)

    ctx = cp.build_cp_context(cu, group, bounds=bounds)
    if bounds is None:
        bounds = [r * T // world for r in range(world + 1)]
    s, e = bounds[rank], bounds[rank + 1]
    local = {k_: (t if d is None else t.narrow(d, s, e - s)) for k_, (t, d) in ins.items()}
    o, st = _call(op, local, offsets, None, ctx, chunk_size, l2)
    loss = (o * do[:, s:e]).sum() + (st.ht * dht).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    where = (f"{op} world={world} rank={rank} B={B} T={T} cu={cu_list} L={L} "
             f"C={chunk_size} bounds={bounds} offsets={offsets.tolist()}")
    # every collective before any comparison (a failure must not leave the others waiting)
    ht, off = st.ht.detach().clone(), st.offsets.clone()
    dist.all_reduce(ht, group=group)
    dist.all_reduce(off, group=group)
    summed = sum_over_ranks(grads, g_ref, group)
    _close(f"o [{where}]", o, o_ref[:, s:e], TOL)
    _close(f"final ht [{where}]", ht, st_ref.ht, TOL)
    assert torch.equal(off, st_ref.offsets), f"final offsets [{where}]: {off} != {st_ref.offsets}"
    for name, g_cp, g_1 in zip(ins, summed, g_ref):
        _close(f"d{name} [{where}]", g_cp, g_1, TOL)


def check_no_final_state(rank, world, group=None):
    """output_final_state=False: no state, the same output."""
    torch.manual_seed(3)
    ins, offsets = _inputs("attn", 1, 16, 2, 5)
    cu = torch.tensor([0, 3, 16], dtype=torch.int32)
    ctx = cp.build_cp_context(cu, group)
    s, e = ctx.bounds[rank], ctx.bounds[rank + 1]
    local = {k_: (t if d is None else t[:, s:e]) for k_, (t, d) in ins.items()}
    o1, st1 = _call("attn", local, offsets, None, ctx, 4, False, want=False)
    o2, st2 = _call("attn", local, offsets, None, ctx, 4, False)
    assert st1 is None and torch.equal(o1, o2)


def check_dense_unequal(rank, world, group=None):
    """A dense context with unequal slices: every rank raises the same ValueError (positions
    are absolute) rather than placing the later ranks' tokens at wrong levels."""
    torch.manual_seed(4)
    T = 6 + rank  # unequal on purpose
    ins, offsets = _inputs("attn", 1, T, 1, 5)
    ctx = cp.build_cp_context(None, group)
    local = {k_: t for k_, (t, d) in ins.items()}
    with pytest.raises(ValueError, match="same number of tokens on every rank"):
        _call("attn", local, offsets, None, ctx, 4, False)


def _cases(world):
    cases = []
    for op in ("attn", "delta"):
        if world == 2:
            cases += [
                # dense, batch 2, offsets per row; L = 5 drops slots, L = 8 keeps them
                (op, 2, 24, None, 5, {"chunk_size": 4}),
                (op, 2, 24, None, 8, {"G": 2, "l2": op == "delta"}),
                # varlen: sequence 1 crosses at 12, an empty sequence, sequence 3 inside rank 1
                (op, 1, 24, [0, 5, 17, 17, 24], 7, {"chunk_size": 4}),
                # length-1 pieces on both sides of the boundary; uneven slices
                (op, 1, 24, [0, 11, 13, 24], 6, {"chunk_size": 2}),
                (op, 1, 20, [0, 9, 20], 6, {"bounds": [0, 8, 20], "chunk_size": 8}),
            ]
        else:
            cases += [
                (op, 2, 18, None, 6, {"chunk_size": 4}),
                # sequence 1 starts on rank 0, passes through rank 1, ends on rank 2
                (op, 1, 18, [0, 2, 16, 18], 7, {"chunk_size": 4}),
                # a length-1 slice passed through; the last rank starts a sequence at its
                # boundary
                (op, 1, 18, [0, 3, 6, 17, 18], 6, {"bounds": [0, 5, 6, 18], "chunk_size": 2}),
            ]
    return cases


def worker(rank, world):
    """The 2-rank cases on the subgroup {0, 1} (a CP group that is not the world group), then
    the 3-rank cases on the world group: one spawn (process start-up is most of the time)."""
    sub = dist.new_group([0, 1])
    runs = [(2, sub, _cases(2), ("check_no_final_state", "check_dense_unequal"))] \
        if rank < 2 else []
    runs.append((world, None, _cases(world), ()))
    failures = []
    for w, group, cases, extras in runs:
        for case in cases:
            try:
                check(rank, w, *case[:-1], **case[-1], group=group)
            except Exception:  # noqa: BLE001
                failures.append(f"world {w} {case}: {traceback.format_exc()}")
        for fn in extras:
            try:
                globals()[fn](rank, w, group)
            except Exception:  # noqa: BLE001
                failures.append(f"world {w} {fn}: {traceback.format_exc()}")
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} failing:\n" + "\n".join(failures))


def test_cp_loglinear_two_and_three_ranks():
    run_ranks(3, worker)
