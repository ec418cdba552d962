"""Causality for non-finite inputs in the chunked engines.

A NaN/Inf in k, v, a gate or beta at token t reaches only tokens >= t in the recurrence, but a
chunked engine multiplies whole chunks at once, and 0 * inf = NaN carries it to the earlier
tokens of the chunk (a masked score times an infinite value). The guard keeps the recurrence's
causality without touching the fast path: when every input is finite (one fused reduction and
one host read per call) it is None and nothing changes. Otherwise the engine runs on inputs with
the non-finite entries replaced by 0 (so tokens before t are computed exactly as the recurrence
does) and every output from t on is set to NaN: all value columns for a bad k, gate or beta
token, the affected columns only for a bad v entry (the recurrence keeps value columns apart).
A gate of -inf is a valid input (decay 0, a state reset), never treated as bad. q is never
cleaned: a bad q_t only reaches o_t, row by row.

Tokens at and after t are NaN here where the recurrence may give +-inf: same non-finiteness,
not the same bits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .precision import accumulation_dtype

Tensor = torch.Tensor


def _token_bad(x: Tensor) -> Tensor:
    """[B, T, H, *] bool -> [B, T, H]: any bad entry of the token."""
    return x.flatten(3).any(-1) if x.dim() > 3 else x


def _heads(bad: Tensor, heads: int) -> Tensor:
    """Per-token flags of H key heads -> `heads` value heads (grouped heads share a key head)."""
    return bad if bad.shape[2] == heads else bad.repeat_interleave(heads // bad.shape[2], 2)


def _seen_so_far(bad: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    """[B, T, ...] bool: was any token <= t of its own sequence bad (varlen: B == 1)."""
    cnt = bad.to(torch.int32).cumsum(1)
    if cu_seqlens is None:
        return cnt > 0
    cu = cu_seqlens.to(device=bad.device, dtype=torch.int64)
    start = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=bad.shape[1])
    before = cnt[:, (start - 1).clamp(min=0)]
    return (cnt - torch.where((start > 0).view(1, -1, *[1] * (bad.dim() - 2)), before, 0)) > 0


@dataclass
class NonFiniteGuard:
    poisoned: Tensor  # [B, T, HV, V]: output entries at or after a bad input of their sequence
    cu_seqlens: Optional[Tensor]

    @staticmethod
    def build(k: Tensor, v: Tensor, decays: Sequence[Optional[Tensor]] = (),
              others: Sequence[Optional[Tensor]] = (),
              cu_seqlens: Optional[Tensor] = None) -> Optional["NonFiniteGuard"]:
        """k [B, T, H, K], v [B, T, HV, V]; decays: log-decay gates ([B, T, H|HV(, K)]), for which
        -inf is valid; others: e.g. beta [B, T, HV]. None when every entry is finite."""
        decays = [t for t in decays if t is not None]
        others = [t for t in others if t is not None]
        if v.numel() == 0 or k.numel() == 0:
            return None
        inf = float("inf")
        ok = [torch.isfinite(t.sum(dtype=accumulation_dtype(t))) for t in [k, v, *others]]
        ok += [t.sum(dtype=accumulation_dtype(t)) < inf for t in decays]  # False for NaN and +inf
        if bool(torch.stack(ok).all()):
            return None
        HV = v.shape[2]
        bad_tok = _heads(_token_bad(~torch.isfinite(k)), HV)
        for t in decays:
            bad_tok = bad_tok | _heads(_token_bad(torch.isnan(t) | (t == inf)), HV)
        for t in others:
            bad_tok = bad_tok | _heads(_token_bad(~torch.isfinite(t)), HV)
        bad = bad_tok[..., None] | ~torch.isfinite(v)
        return NonFiniteGuard(_seen_so_far(bad, cu_seqlens), cu_seqlens)

    def clean(self, k: Tensor, v: Tensor, decays: Sequence[Optional[Tensor]] = (),
              others: Sequence[Optional[Tensor]] = ()):
        """The inputs with non-finite entries replaced by 0 (a -inf gate is kept)."""
        def fix(t, keep_neg_inf=False):
            if t is None:
                return None
            good = torch.isfinite(t)
            if keep_neg_inf:
                good |= t == float("-inf")
            return torch.where(good, t, torch.zeros((), dtype=t.dtype, device=t.device))
        return (fix(k), fix(v), tuple(fix(t, True) for t in decays)) + \
            ((tuple(fix(t) for t in others),) if others else ())

    def _final_mask(self) -> Tensor:
        """[N, HV, V]: final states of sequences that saw a bad input."""
        p = self.poisoned
        if self.cu_seqlens is None:
            return p[:, -1]
        cu = self.cu_seqlens.to(device=p.device, dtype=torch.int64)
        last = p[0, (cu[1:] - 1).clamp(min=0)]
        return last & (cu[1:] > cu[:-1])[:, None, None]

    def poison(self, o: Tensor, final: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        o = o.masked_fill(self.poisoned, float("nan"))
        if final is not None:
            final = final.masked_fill(self._final_mask()[:, :, None, :], float("nan"))
        return o, final

    def clean_grads(self, do: Tensor, dht: Optional[Tensor]):
        """Output gradients with the poisoned entries' share dropped (they are NaN, not
        functions of the inputs)."""
        do = do.masked_fill(self.poisoned, 0)
        if dht is not None:
            dht = dht.masked_fill(self._final_mask()[:, :, None, :], 0)
        return do, dht
