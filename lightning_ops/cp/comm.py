"""The one collective of context parallelism: an all-gather of every rank's summary.

Forward: all_gather of a flat buffer per rank (its crossing state and its transition), so every
rank holds all (transition, state) pairs (LASP-2). Backward: the gradient of rank j's summary is
the sum over ranks of their gradients w.r.t. the gathered copy of it — a reduce-scatter on NCCL,
an all-reduce (then the own row) on backends without reduce-scatter (gloo).

Every rank must call the backward (as with FSDP / DDP collectives): the exchange passes the op's
local outputs through itself ("anchors"), so its backward runs whenever the rank's loss depends on
any output of the op, even on a rank that uses none of the gathered summaries (rank 0).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def _reduce_scatter_supported(group) -> bool:
    backend = str(dist.get_backend(group)).lower()
    return "nccl" in backend or "xccl" in backend


def _gather(out: Tensor, flat: Tensor, group) -> None:
    if hasattr(dist, "all_gather_single"):  # torch >= 2.13 name of all_gather_into_tensor
        dist.all_gather_single(out, flat, group=group)
    else:
        dist.all_gather_into_tensor(out, flat, group=group)


class _AllGatherSummaries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cp, summary: Tensor, *anchors: Tensor):
        ctx.cp = cp
        summary = summary.contiguous()
        out = summary.new_empty((cp.world * summary.numel(),))
        _gather(out, summary.reshape(-1), cp.group)
        out = out.view((cp.world,) + tuple(summary.shape))
        nbytes = summary.numel() * summary.element_size()
        cp.bytes_sent += nbytes * (cp.world - 1)
        cp.bytes_received += nbytes * (cp.world - 1)
        cp.collectives += 1
        return (out,) + tuple(a.view_as(a) for a in anchors)

    @staticmethod
    def backward(ctx, gout: Tensor, *ganchors):
        cp = ctx.cp
        gout = gout.contiguous()
        nbytes = gout[0].numel() * gout.element_size()
        if _reduce_scatter_supported(cp.group):
            gsum = gout.new_empty(gout.shape[1:])
            dist.reduce_scatter_tensor(gsum, gout, group=cp.group)
            moved = nbytes * (cp.world - 1)
        else:  # gloo: no reduce-scatter; a (ring) all-reduce of the [world, *] gradient
            dist.all_reduce(gout, group=cp.group)
            gsum = gout[cp.rank]
            moved = 2 * nbytes * (cp.world - 1)
        cp.bytes_sent += moved
        cp.bytes_received += moved
        cp.collectives += 1
        return (None, gsum) + tuple(ganchors)


def exchange(cp, summary: Tensor, *anchors: Tensor) -> Tuple[Tensor, ...]:
    """All-gather summary [*] -> [world, *]; returns (gathered, *anchors) with the anchors passed
    through (see the module docstring). One collective forward, one backward."""
    if cp.world == 1:
        return (summary[None],) + anchors
    return _AllGatherSummaries.apply(cp, summary, *anchors)
