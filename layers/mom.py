"""Mixture-of-Memories (Du et al., 2025): several gated-delta-rule memories per layer, a top-k
token router, and an optional shared memory every token writes to."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FlaMixer, MixerStep, check_mode, warn_ignored
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import (apply_mask, compute_dtype, decay_gate, init_dt_bias, init_linear,
                    no_weight_decay, segment_ids, split_heads)

Tensor = torch.Tensor


class _MemoryConv(ShortConvolution):
    """A short conv run on each memory's token subsequence: one weight, a state per (sequence,
    memory), cached as [N, memories * D, W]."""

    def __init__(self, hidden_size, kernel_size, bias, activation, memories, **kw):
        super().__init__(hidden_size, kernel_size, bias, activation, **kw)
        self.memories = memories

    def state_shape(self) -> Tuple[int, int]:
        return (self.memories * self.hidden_size, self.width)


def load_balancing_loss(router_logits: Tensor, num_memories: int, topk: int,
                        attention_mask: Optional[Tensor] = None) -> Tensor:
    """The Switch / Mixtral auxiliary loss on MoM's router logits [tokens, num_memories]:
    num_memories * sum_e (fraction of routed slots to e) * (mean router probability of e);
    1.0 when balanced. attention_mask [B, T] drops padded tokens (logits from B x T)."""
    probs = router_logits.float().softmax(-1)
    chosen = F.one_hot(probs.topk(topk, dim=-1).indices, num_memories).float()  # [N, k, E]
    if attention_mask is not None:
        w = attention_mask.reshape(-1).float()
        frac = (chosen * w[:, None, None]).sum(0) / w.sum().clamp_min(1)
        mean_p = (probs * w[:, None]).sum(0) / w.sum().clamp_min(1)
    else:
        frac, mean_p = chosen.mean(0), probs.mean(0)
    return num_memories * (frac * mean_p[None]).sum() / topk


class MomAttention(FlaMixer):
    """Mixture-of-Memories with gated-delta-rule memories, as fla's `MomAttention` (same
    arguments, parameter names and init; forward returns fla's 4-tuple `(o, None,
    past_key_values, router_logits [B*T, num_memories])`).

    A router (`gate`, softmax, top-k, weights renormalised) sends each token to `topk` of
    `num_memories` memories; memory e has its own k/v/beta/decay projections (`k_proj[e]`, ...,
    or the `shared_*` ones with single_kv_proj) and its own state, updated only by its tokens:
    `S_e <- exp(g) S_e` then the delta rule with the l2-normalised k, q shared. Tokens are grouped
    per (sequence, memory) into one packed varlen batch, so each memory is ONE call of the public
    `chunk_gated_delta_rule` over all memories (no Python loop over memories, no host sync); the
    short convs (SiLU) run over each memory's subsequence. A token's output is the routing-weighted
    sum of its memories' outputs (plus the shared memory's, weight 1, with shared_mem), then a
    gated RMSNorm (swish(g_proj(x))) and o_proj.

    Args: hidden_size, head_dim, num_heads, expand_v (value head dim = head_dim * expand_v), mode,
        use_output_gate, use_short_conv, conv_size, conv_bias, layer_idx, norm_eps,
        num_memories, topk, capacity (accepted; no token is dropped), shared_mem,
        single_kv_proj: fla's.
    Cache: recurrent_state [N, E, H, K, V] (E = num_memories + shared_mem), conv states
    [N, E * D, W] (one per memory); a memory no token of a step is routed to keeps its state.
    The per-memory k/v/beta/decay projections are one matmul over all memories followed by a
    gather (num_memories / topk more projection FLOPs than a grouped GEMM; simple, sync-free).
    """

    def __init__(self, hidden_size: int = 2048, head_dim: int = 256, num_heads: int = 4,
                 expand_v: float = 2, mode: str = "chunk", use_output_gate: bool = True,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False,
                 layer_idx: Optional[int] = None, norm_eps: float = 1e-5,
                 num_memories: int = 8, topk: int = 2, capacity: float = 1.0,
                 shared_mem: bool = False, single_kv_proj: bool = False, device=None,
                 dtype=None, **kwargs):
        super().__init__()
        warn_ignored("MomAttention", kwargs)
        if not 1 <= topk <= num_memories:
            raise ValueError(f"topk must be in [1, num_memories={num_memories}], got {topk}")
        kw = dict(device=device, dtype=dtype)
        self.mode = check_mode(mode)
        self.hidden_size, self.head_dim, self.num_heads = hidden_size, head_dim, num_heads
        self.expand_v, self.num_memories, self.topk = expand_v, num_memories, topk
        self.capacity, self.shared_mem, self.single_kv_proj = capacity, shared_mem, single_kv_proj
        self.use_output_gate, self.use_short_conv = use_output_gate, use_short_conv
        self.conv_size, self.conv_bias, self.layer_idx = conv_size, conv_bias, layer_idx
        self.key_dim = num_heads * head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.value_dim = num_heads * self.head_v_dim
        self.head_qk_dim = head_dim
        self.num_slots_memories = num_memories + int(shared_mem)
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.gate = nn.Linear(hidden_size, num_memories, bias=False, **kw)
        lin = lambda o: nn.Linear(hidden_size, o, bias=False, **kw)  # noqa: E731
        if single_kv_proj or shared_mem:
            self.shared_k, self.shared_v = lin(self.key_dim), lin(self.value_dim)
            self.shared_b, self.shared_a = lin(num_heads), lin(num_heads)
        if not single_kv_proj:
            self.k_proj = nn.ModuleList([lin(self.key_dim) for _ in range(num_memories)])
            self.v_proj = nn.ModuleList([lin(self.value_dim) for _ in range(num_memories)])
            self.b_proj = nn.ModuleList([lin(num_heads) for _ in range(num_memories)])
            self.a_proj = nn.ModuleList([lin(num_heads) for _ in range(num_memories)])
        A = torch.empty(num_heads, dtype=torch.float32, device=device).uniform_(0, 16)
        self.A_log = nn.Parameter(torch.log(A))
        self.dt_bias = nn.Parameter(init_dt_bias(num_heads, device=device))
        no_weight_decay(self.A_log, self.dt_bias)
        E = self.num_slots_memories
        if use_short_conv:
            self.q_conv1d = _MemoryConv(self.key_dim, conv_size, conv_bias, "silu", E, **kw)
            self.k_conv1d = _MemoryConv(self.key_dim, conv_size, conv_bias, "silu", E, **kw)
            self.v_conv1d = _MemoryConv(self.value_dim, conv_size, conv_bias, "silu", E, **kw)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
        self.o_norm = RMSNorm(self.head_v_dim, norm_eps, gate_fn="swish", **kw)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)
        init_linear(self)
        # router logits of the current forward() call only: mix() (CausalLM) and decode steps
        # never keep them, so no autograd graph outlives its call
        self._router_logits: Optional[Tensor] = None
        self._want_logits = False

    def state_shape(self) -> Tuple[int, ...]:
        return (self.num_slots_memories, self.num_heads, self.head_dim, self.head_v_dim)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.q_conv1d, self.k_conv1d, self.v_conv1d] if self.use_short_conv else []

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values=None, use_cache: Optional[bool] = False,
                output_attentions: Optional[bool] = False, **kwargs):
        """fla's contract (FlaMixer.forward) plus router_logits [B*T, num_memories], as fla."""
        self._want_logits = True
        try:
            o, attn, pkv = super().forward(hidden_states, attention_mask, past_key_values,
                                           use_cache, output_attentions, **kwargs)
        finally:
            self._want_logits = False
        logits, self._router_logits = self._router_logits, None
        if logits is None:  # no tokens
            logits = hidden_states.new_zeros(0, self.num_memories)
        return o, attn, pkv, logits.reshape(-1, self.num_memories)

    def _per_memory(self, x: Tensor, name: str, dim: int) -> Tensor:
        """x [B*T, D] -> [B*T, E, dim]: every memory's projection (one matmul)."""
        if self.single_kv_proj:
            w = getattr(self, f"shared_{name}").weight
            return F.linear(x, w)[:, None].expand(-1, self.num_slots_memories, -1)
        ws = [m.weight for m in getattr(self, f"{name}_proj")]
        if self.shared_mem:
            ws.append(getattr(self, f"shared_{name}").weight)
        return F.linear(x, torch.cat(ws, 0)).view(x.shape[0], len(ws), dim)

    def _cp_note(self) -> str:
        return ("; MoM regroups the tokens per memory, so a memory's sequence does not follow "
                "the ranks' slices")

    def _mix(self, x: Tensor, step: MixerStep):
        B, T, D = x.shape
        M, E, H = self.num_memories, self.num_slots_memories, self.num_heads
        cd = compute_dtype(x)
        logits = self.gate(x)
        if self._want_logits:
            self._router_logits = logits
        rd = torch.promote_types(logits.dtype, torch.float32)  # fp32 router (fp64 stays)
        w, sel = logits.to(rd).softmax(-1).topk(self.topk, dim=-1)        # [B, T, k]
        w = w / w.sum(-1, keepdim=True)
        if self.shared_mem:
            sel = torch.cat([sel, sel.new_full((B, T, 1), M)], -1)
            w = torch.cat([w, w.new_ones(B, T, 1)], -1)
        S = sel.shape[-1]
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if step.mask is None \
            else step.mask
        # the sequence of each token: its row, or its packed segment
        t_idx = torch.arange(T, device=x.device).view(1, T, 1)
        if step.cu_seqlens is None:
            N, row = B, torch.arange(B, device=x.device).view(B, 1, 1)
        else:
            N = step.cu_seqlens.numel() - 1
            row = segment_ids(step.cu_seqlens, T).to(torch.int64).view(1, T, 1)
        # group the (token, slot) pairs per (sequence, memory), in time order; padding last
        grp = torch.where(valid[..., None], row * E + sel, N * E)           # [B, T, S]
        b_idx = torch.arange(B, device=x.device).view(B, 1, 1)
        flat = (b_idx * T + t_idx) * S + torch.arange(S, device=x.device)
        key = grp * (B * T * S) + flat
        order = key.flatten().argsort()
        P = order.numel()
        bounds = torch.arange(N * E + 1, device=x.device)
        cu = torch.cat([torch.searchsorted(grp.flatten()[order].contiguous(), bounds),
                        bounds.new_full((1,), P)]).to(torch.int32)
        tok = order // S
        mem = sel.flatten()[order]
        xt = x.reshape(B * T, D)
        xs = xt[tok][None]                                                     # [1, P, D]
        pick = lambda t: t[tok, mem][None]  # noqa: E731
        q = self.q_proj(xs)
        k = pick(self._per_memory(xt, "k", self.key_dim))
        v = pick(self._per_memory(xt, "v", self.value_dim))
        beta = torch.sigmoid(pick(self._per_memory(xt, "b", H)).to(cd))
        g = decay_gate(self.A_log, pick(self._per_memory(xt, "a", H)), self.dt_bias, cd)
        # states: one per (sequence, memory), and a throwaway one for the padding segment
        def states_in(s, shape):
            if s is None:
                return None
            s = s.reshape(N * E, *shape)
            return torch.cat([s, s.new_zeros(1, *shape)])

        if self.use_short_conv:
            outs = []
            for i, (conv, t) in enumerate(zip(self.conv_layers(), (q, k, v))):
                h0 = None if step.conv_in is None else \
                    states_in(step.conv_in[i], (conv.hidden_size, conv.width))
                y, fin = conv(t, None, cu, h0, step.want_state)
                if fin is not None:
                    step.conv_out.append(fin[:N * E].reshape(N, E * conv.hidden_size,
                                                             conv.width))
                outs.append(y)
            q, k, v = outs
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k, v = split_heads(q, H), split_heads(k, H), split_heads(v, H)
        h0 = states_in(step.state, (H, self.head_dim, self.head_v_dim))
        fn = step.op(self, x, "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")
        o, ht = fn(q, k, v, g, beta.to(q.dtype), initial_state=h0,
                   output_final_state=step.want_state, cu_seqlens=cu,
                   use_qk_l2norm_in_kernel=True)
        # back to (token, slot) order by the inverse permutation (a gather: deterministic)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(P, device=x.device)
        o = o[0][inv].view(B, T, S, H, self.head_v_dim)
        o = (o.to(cd) * w.to(cd)[..., None, None]).sum(2).to(x.dtype)
        gate = split_heads(self.g_proj(x), H) if self.use_output_gate else None
        o = self.o_norm(o, gate).reshape(B, T, self.value_dim)
        state = None if ht is None else ht[:N * E].reshape(N, E, *ht.shape[1:])
        return apply_mask(self.o_proj(o), step.mask), state
