"""Context parallel (lightning_ops.cp) on gloo CPU ranks: outputs, final states and every
gradient equal the single-process public op, for every family, dense and varlen with sequences
across (and through) rank boundaries, initial states on the ranks where sequences start.

Two spawns only (process start-up dominates on a loaded 2-core CI machine); each rank runs many
tiny cases. float64 cases compare at 1e-10, fp32 ones at 1e-5."""
from __future__ import annotations

import pytest
import torch

from cp_harness import FAMILIES, run_ranks, worker_suite

import lightning_ops.cp as cp

F64, F32 = torch.float64, torch.float32

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def test_cp_two_ranks_every_family_and_fsdp2():
    cases = []
    for fam in FAMILIES:
        cases.append((fam, 2, 24, None, F64, 1e-10))                 # dense, batch 2
        cases.append((fam, 1, 24, [0, 5, 17, 17, 24], F64, 1e-10))   # varlen, empty sequence
    cases.append(("gla", 3, 20, None, F32, 1e-5))
    cases.append(("kda", 1, 20, [0, 7, 20], F32, 1e-5))
    cases.append(("ssd", 1, 20, [0, 12, 20], F64, 1e-10, [0, 9, 20]))  # uneven slices
    run_ranks(2, worker_suite, cases, ("check_comm_volume", "check_fsdp2_training"))


def test_cp_four_ranks_sequences_through_ranks():
    cases = []
    # (linear attention shares simple GLA's path, the gated delta rule the delta rule's and
    # KDA's: the 2-rank test covers them; 4 processes on 2 cores are what costs time here)
    for fam in ("simple_gla", "gla", "delta", "kda", "ssd", "conv"):
        # sequence 1 starts on rank 0, passes through ranks 1 and 2, ends on rank 3
        cases.append((fam, 1, 24, [0, 3, 20, 21, 24], F64, 1e-10))
    for fam in ("conv", "delta"):
        # slices shorter than the conv history (2 < W-1 = 3); a boundary on a sequence start
        cases.append((fam, 1, 24, [0, 2, 13, 24], F64, 1e-10, [0, 2, 12, 14, 24]))
    run_ranks(4, worker_suite, cases)


# ------------------------------------------------------------------------------------------------
# the context's tables (no process group needed)
# ------------------------------------------------------------------------------------------------
def test_context_tables_varlen():
    cu = torch.tensor([0, 3, 20, 21, 24])
    ctxs = [cp.build_cp_context(cu, rank=r, world=4) for r in range(4)]
    assert ctxs[0].bounds == [0, 6, 12, 18, 24]
    assert [c.pieces for c in ctxs] == [
        [(0, 0, 3), (1, 3, 6)], [(1, 6, 12)], [(1, 12, 18)], [(1, 18, 20), (2, 20, 21), (3, 21, 24)]]
    assert ctxs[0].first_cont_all == [False, True, True, True]
    assert ctxs[0].crosses_all == [True, True, True, False]
    assert ctxs[0].passes_all == [False, True, True, False]
    assert [c.chain() for c in ctxs] == [[], [0], [0, 1], [0, 1, 2]]
    assert ctxs[3].local_cu_seqlens("cpu").tolist() == [0, 2, 3, 6]
    assert ctxs[3].starts_here == [False, True, True] and ctxs[3].ends_here == [True] * 3


def test_context_tables_boundaries_and_empty_sequences():
    cu = torch.tensor([0, 6, 6, 13, 24])
    ctxs = [cp.build_cp_context(cu, rank=r, world=4) for r in range(4)]
    # the empty sequence at 6 belongs to rank 1 (the owner of position 6)
    assert ctxs[0].pieces == [(0, 0, 6)] and ctxs[1].pieces == [(1, 6, 6), (2, 6, 12)]
    assert ctxs[0].crosses_all == [False, True, True, False]
    assert ctxs[1].chain() == [] and ctxs[2].chain() == [1] and ctxs[3].chain() == [2]


def test_context_dense_and_errors():
    c = cp.build_cp_context(None, rank=1, world=3)
    assert c.dense and c.chain() == [0] and c.crosses() and c.passes()
    assert cp.build_cp_context(None, rank=2, world=3).chain() == [0, 1]
    with pytest.raises(ValueError, match="divisible"):
        cp.build_cp_context(torch.tensor([0, 5]), rank=0, world=2)
    with pytest.raises(ValueError, match="bounds"):
        cp.build_cp_context(torch.tensor([0, 5]), rank=0, world=2, bounds=[0, 0, 5])
    with pytest.raises(RuntimeError, match="process group"):
        cp.build_cp_context(None)


def test_without_context_is_the_public_op():
    q, k, v = (torch.randn(1, 5, 2, 4) for _ in range(3))
    import lightning_ops as lo
    o1, h1 = cp.chunk_linear_attn(q, k, v, output_final_state=True)
    o2, h2 = lo.chunk_linear_attn(q, k, v, output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(h1, h2)


def test_varlen_context_errors_before_any_collective():
    ctx = cp.build_cp_context(torch.tensor([0, 3, 8]), rank=0, world=2)  # rank 0: tokens 0..3
    q, k, v = (torch.randn(1, 5, 2, 4) for _ in range(3))
    with pytest.raises(ValueError, match="context gives this rank"):
        cp.chunk_linear_attn(q, k, v, cp_context=ctx)
    q, k, v = (torch.randn(2, 4, 2, 4) for _ in range(3))
    with pytest.raises(ValueError, match="batch size must be 1"):
        cp.chunk_linear_attn(q, k, v, cp_context=ctx)
    q, k, v = (torch.randn(1, 4, 2, 4) for _ in range(3))
    with pytest.raises(ValueError, match="packs 2 sequences"):
        cp.chunk_linear_attn(q, k, v, initial_state=torch.zeros(3, 2, 4, 4), cp_context=ctx)
    with pytest.raises(ValueError, match="GLOBAL cu_seqlens"):
        cp.chunk_linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 4]), cp_context=ctx)
