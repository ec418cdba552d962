"""The one collective of context parallelism: an all-gather of every rank's summary.

Forward: all_gather of a flat buffer per rank (its crossing state and its transition), so every
rank holds all (transition, state) pairs (LASP-2). Backward: the gradient of rank j's summary is
the sum over ranks of their gradients w.r.t. the gathered copy of it — a reduce-scatter on NCCL,
an all-reduce (then the own row) on backends without reduce-scatter (gloo).

Every rank must call the backward (as with FSDP / DDP collectives): the exchange passes the op's
local outputs through itself ("anchors"), so its backward runs whenever the rank's loss depends on
any output of the op, even on a rank that uses none of the gathered summaries (rank 0).

Under torch.compile (fullgraph too) dynamo traces the c10d calls as functional collectives, and
graph passes treat those as pure: they drop a collective whose result is unused (rank 0 never
reads the gathered summaries, the last rank's summary is a constant so its gradient goes
nowhere), move a backward collective whose input is a constant into the forward graph (rank 0's
gradient of the unused gathered buffer is zeros) and merge collectives of equal constant inputs
(the zero summaries of two ops on the last rank). The ranks' graphs would then run different
collectives, or in another order, and hang or fail. So when compiling, `_tie` (an opaque copy
carrying a data dependence) ties the summary to the op's first anchor (its own data) and that
anchor to the gathered buffer; in backward, the buffer to reduce to the first anchor's incoming
gradient and that gradient to the reduced buffer: every rank's graphs keep every collective in
its place. The byte / collective counters of the context are not updated inside compiled code
(a traced autograd.Function cannot mutate outer Python state).
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


@torch.library.custom_op("lightning_ops::cp_tie", mutates_args=())
def _tie(x: Tensor, dep: Tensor) -> Tensor:
    """A copy of x that depends on dep as far as any graph pass can tell (see the docstring)."""
    return x.clone()


@_tie.register_fake
def _(x, dep):
    return torch.empty_like(x)


def _tie_backward(ctx, grad):
    return grad, None


_tie.register_autograd(_tie_backward)


class _AllGatherSummaries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cp, summary: Tensor, *anchors: Tensor):
        ctx.cp = cp
        summary = summary.contiguous()
        out = summary.new_empty((cp.world * summary.numel(),))
        _gather(out, summary.reshape(-1), cp.group)
        out = out.view((cp.world,) + tuple(summary.shape))
        if not torch.compiler.is_compiling():
            nbytes = summary.numel() * summary.element_size()
            cp.bytes_sent += nbytes * (cp.world - 1)
            cp.bytes_received += nbytes * (cp.world - 1)
            cp.collectives += 1
        return (out,) + tuple(a.view_as(a) for a in anchors)

    @staticmethod
    def backward(ctx, gout: Tensor, *ganchors):
        cp = ctx.cp
        gout = gout.contiguous()
        tie = torch.compiler.is_compiling() and bool(ganchors) and ganchors[0] is not None
        if tie:  # an input only backward has: the reduce stays in the backward graph
            gout = _tie(gout, ganchors[0])
        nbytes = gout[0].numel() * gout.element_size()
        if _reduce_scatter_supported(cp.group):
            gsum = gout.new_empty(gout.shape[1:])
            dist.reduce_scatter_tensor(gsum, gout, group=cp.group)
            moved = nbytes * (cp.world - 1)
        else:  # gloo: no reduce-scatter; a (ring) all-reduce of the [world, *] gradient
            dist.all_reduce(gout, group=cp.group)
            gsum = gout[cp.rank]
            moved = 2 * nbytes * (cp.world - 1)
        if not torch.compiler.is_compiling():
            cp.bytes_sent += moved
            cp.bytes_received += moved
            cp.collectives += 1
        if tie:
            ganchors = (_tie(ganchors[0], gsum),) + tuple(ganchors[1:])
        return (None, gsum) + tuple(ganchors)


def exchange(cp, summary: Tensor, *anchors: Tensor) -> Tuple[Tensor, ...]:
    """All-gather summary [*] -> [world, *]; returns (gathered, *anchors) with the anchors passed
    through (see the module docstring). One collective forward, one backward."""
    if cp.world == 1:
        return (summary[None],) + anchors
    tie = torch.compiler.is_compiling() and bool(anchors)
    if tie:  # (see the module docstring)
        summary = _tie(summary, anchors[0])
    out = _AllGatherSummaries.apply(cp, summary, *anchors)
    if tie:
        out = (out[0], _tie(out[1], out[0])) + tuple(out[2:])
    return out
