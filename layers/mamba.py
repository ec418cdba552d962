"""Mamba (Gu & Dao, 2023) and Mamba-2 (Dao & Gu, 2024) mixer blocks, as in mamba-ssm."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import lightning_ops as lo

from .base import MambaMixer, MixerStep
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import (NO_DT_LIMIT, apply_mask, compute_dtype, decay_rate, init_dt_bias,
                    no_weight_decay, repack, softplus_dt, split_xbc, unpack_left)

Tensor = torch.Tensor


def _decode_state(state: Tensor, single_token: bool) -> Tensor:
    """selective_state_update works in place. A one-token decode step under no_grad (inference)
    updates the cache's own tensor, as mamba-ssm does (no copy of a large state per token);
    anything else works on a copy (autograd needs the old value; multi-token calls leave the
    caller's cache intact)."""
    return state if single_token and not torch.is_grad_enabled() else state.clone()


class Mamba(MambaMixer):
    """The Mamba-1 mixer block (selective SSM), as mamba-ssm's `Mamba` (same argument names,
    defaults, parameter names and init):

        x, z = in_proj(u);  x = silu(conv1d(x));  dt, B, C = x_proj(x)
        y = selective_scan(x, dt_proj(dt), A = -exp(A_log), B, C, D, z=z);  out = out_proj(y)

    Args:
        d_model (alias hidden_size): model width.
        d_state: SSM state size N per channel.
        d_conv: width of the causal depthwise conv (2..4).
        expand: d_inner = expand * d_model.
        dt_rank: rank of the dt projection ('auto' = ceil(d_model / 16)).
        dt_min, dt_max, dt_init_floor: softplus(dt_proj.bias) log-uniform in [dt_min, dt_max].
        dt_init: 'random' (uniform dt_proj.weight in +-dt_rank^-0.5 * dt_scale) or 'constant'.
        dt_scale: scale of the dt_proj weight init.
        conv_bias, bias: biases of conv1d and of in_proj / out_proj.
        use_fast_path: accepted (mamba-ssm's fused-kernel switch; the math is the same).
        layer_idx: the layer's slot in `inference_params.key_value_memory_dict`.
    A_log = log([1..d_state]) per channel (S4D-real), D = 1: float32, no weight decay.
    Arguments (and positional order), defaults, parameter names and the forward contract are
    mamba-ssm's: `forward(hidden_states, inference_params=None)`, `step`,
    `allocate_inference_cache` (see `MambaMixer`); extras: `hidden_size` (alias of d_model),
    and forward's keyword-only `attention_mask` (any 0/1 padding) and `cu_seqlens` (packing).
    Decoding (one token from a cache) uses selective_state_update; a multi-token call that
    continues a cache steps token by token (selective_scan_fn takes no initial state).
    """

    def __init__(self, d_model: int = 1024, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: Optional[int] = None, device=None, dtype=None, *,
                 hidden_size: Optional[int] = None):
        super().__init__()
        self.use_fast_path = use_fast_path
        kw = dict(device=device, dtype=dtype)
        d_model = hidden_size if hidden_size is not None else d_model
        self.d_model = self.hidden_size = d_model
        self.d_state, self.d_conv, self.expand = d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **kw)
        self.conv1d = ShortConvolution(self.d_inner, d_conv, conv_bias, "silu", **kw)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **kw)
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor,
                                                 device))
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(A).repeat(self.d_inner, 1))  # [d_inner, d_state]
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        no_weight_decay(self.A_log, self.D)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.d_inner, self.d_state)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.conv1d]

    def forward(self, hidden_states: Tensor, inference_params=None, *,
                attention_mask: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, cp_context=None) -> Tensor:
        """hidden_states [B, L, d_model] -> out [B, L, d_model]. With inference_params: a
        prefill (seqlen_offset 0) or a continuation (> 0) of the states in
        `inference_params.key_value_memory_dict[layer_idx]`, updated in place. cp_context:
        not supported (lightning_ops.cp has no selective-scan wrapper); raises."""
        return self._run(hidden_states, inference_params, attention_mask, cu_seqlens,
                         cp_context=cp_context)

    def _cp_note(self) -> str:
        return "; lightning_ops.cp has no selective_scan_fn wrapper (Mamba-1)"

    def _mix(self, u: Tensor, step: MixerStep):
        if step.cu_seqlens is not None:
            # selective_scan_fn has no varlen form: run the sequences as left-padded rows
            rows, mask, index = unpack_left(u, step.cu_seqlens)
            inner = MixerStep(mask, None, None, step.want_state)
            inner.state, inner.conv_in, inner.has_history = step.state, step.conv_in, \
                step.has_history
            out, state = self._mix(rows, inner)
            step.conv_out.extend(inner.conv_out)
            return repack(out, index), state
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = step.conv(self.conv1d, x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)                  # bias added in the op
        cd = compute_dtype(x)
        A = decay_rate(self.A_log, cd)
        D, dt_bias = self.D.to(cd), self.dt_proj.bias.to(cd)
        softplus = True
        def padded_dt(dt, mask, bias):
            # dt = 0 on padding: no decay and no input there (exp(0 A) = 1, 0 * B x = 0)
            return torch.where(mask, softplus_dt(dt, bias, cd), 0).to(x.dtype)

        if step.has_history:  # continue the cached state token by token
            if step.mask is not None:
                dt = padded_dt(dt, step.mask[..., None], dt_bias)
            state = _decode_state(step.state, x.shape[1] == 1)
            ys = [lo.selective_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D,
                                              z[:, t], None if step.mask is not None else
                                              dt_bias, step.mask is None)
                  for t in range(x.shape[1])]
            y = torch.stack(ys, dim=1)
        else:
            def cf(t):  # [B, L, D] -> contiguous [B, D, L], mamba-ssm's layout
                return t.transpose(1, 2).contiguous()
            dt = cf(dt)
            if step.mask is not None:  # in the channels-first layout (compiled strides agree)
                dt = padded_dt(dt, step.mask[:, None, :], dt_bias[:, None]).contiguous()
                dt_bias, softplus = None, False
            res = lo.selective_scan_fn(cf(x), dt, A, cf(B), cf(C), D, cf(z), dt_bias,
                                         softplus, return_last_state=step.want_state)
            y, state = res if step.want_state else (res, None)
            y = y.transpose(1, 2)
        return apply_mask(self.out_proj(y), step.mask), state


class Mamba2(MambaMixer):
    """The Mamba-2 mixer block (SSD), as mamba-ssm's `Mamba2`:

        z0, x0, z, xBC, dt = in_proj(u);  x, B, C = silu(conv1d(xBC))
        y = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, softplus);  y = norm(y, gate=z)
        out = out_proj([silu(z0) * x0, y])       (the z0/x0 gated MLP only when d_ssm < d_inner)

    Args:
        d_model (alias hidden_size): model width.
        d_state: state size N per head.
        d_conv: width of the causal depthwise conv on xBC (2..4).
        conv_init: init conv1d.weight uniform in +-conv_init (default: PyTorch's).
        expand: d_inner = expand * d_model.
        headdim: head dim P (nheads = d_ssm / headdim).
        d_ssm: channels that go through the SSM (default d_inner); the other d_inner - d_ssm
            form a gated MLP, as mamba-ssm.
        ngroups: groups of heads sharing B and C.
        A_init_range: A ~ U(A_init_range), stored as A_log (float32, no weight decay).
        D_has_hdim: D per channel [d_ssm] instead of per head [nheads].
        rmsnorm, norm_before_gate: gated RMSNorm of y (else y * silu(z) in the op).
        dt_min, dt_max, dt_init_floor: softplus(dt_bias) log-uniform in [dt_min, dt_max].
        dt_limit: clamp of dt after the softplus.
        bias, conv_bias: biases of in_proj / out_proj and conv1d.
        chunk_size: SSD chunk length (a power of two).
        use_mem_eff_path: accepted (mamba-ssm's fused-kernel switch; same math).
        layer_idx: the layer's slot in `inference_params.key_value_memory_dict`.
        process_group, sequence_parallel: tensor parallelism is not supported (process_group
            must be None).
    Arguments (and positional order), defaults, parameter names and the forward contract are
    mamba-ssm's: `forward(u, seqlen=None, seq_idx=None, cu_seqlens=None,
    inference_params=None)`, `step`, `allocate_inference_cache` (see `MambaMixer`); extras:
    `hidden_size` and forward's keyword-only `attention_mask` (any 0/1 padding) and
    `cp_context` (context parallelism over a process group, lightning_ops.cp).
    """

    supports_cp = True

    def __init__(self, d_model: int = 1024, d_state: int = 128, d_conv: int = 4,
                 conv_init: Optional[float] = None, expand: int = 2, headdim: int = 64,
                 d_ssm: Optional[int] = None, ngroups: int = 1,
                 A_init_range: Tuple[float, float] = (1, 16), D_has_hdim: bool = False,
                 rmsnorm: bool = True, norm_before_gate: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit: Tuple[float, float] = (0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: Optional[int] = None, process_group=None,
                 sequence_parallel: bool = True, device=None, dtype=None, *,
                 hidden_size: Optional[int] = None):
        super().__init__()
        if process_group is not None:
            raise NotImplementedError("Mamba2: tensor parallelism (process_group) is not "
                                      "supported; pass process_group=None")
        kw = dict(device=device, dtype=dtype)
        d_model = hidden_size if hidden_size is not None else d_model
        self.d_model = self.hidden_size = d_model
        self.d_state, self.d_conv, self.expand, self.headdim = d_state, d_conv, expand, headdim
        self.conv_init, self.use_mem_eff_path = conv_init, use_mem_eff_path
        self.sequence_parallel, self.process_group = sequence_parallel, None
        self.d_inner = int(expand * d_model)
        self.d_ssm = self.d_inner if d_ssm is None else int(d_ssm)
        if not 0 < self.d_ssm <= self.d_inner:
            raise ValueError(f"d_ssm must be in (0, d_inner = {self.d_inner}], got {d_ssm}")
        if self.d_ssm % headdim:
            raise ValueError(f"d_ssm = {self.d_ssm} (default d_inner = expand * d_model) must "
                             f"be divisible by headdim {headdim}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups {ngroups} must divide the {self.nheads} heads")
        if chunk_size < 1 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.ngroups, self.D_has_hdim, self.rmsnorm = ngroups, D_has_hdim, rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit, self.chunk_size, self.layer_idx = tuple(dt_limit), chunk_size, layer_idx
        self.activation = "silu"
        self.d_mlp = self.d_inner - self.d_ssm
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **kw)
        self.conv1d = ShortConvolution(conv_dim, d_conv, conv_bias, "silu", **kw)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor,
                                                 device))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads,
                                         device=device))
        no_weight_decay(self.dt_bias, self.A_log, self.D)
        if rmsnorm:
            self.norm = RMSNorm(self.d_ssm, 1e-5, group_size=self.d_ssm // ngroups,
                                gate_fn="silu", norm_before_gate=norm_before_gate, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.nheads, self.headdim, self.d_state)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.conv1d]

    def _conv_layout(self, conv_state: Tensor) -> Tensor:
        # mamba-ssm allocates [B, W, D] and hands out the [B, D, W] transpose
        return conv_state.transpose(1, 2).contiguous().transpose(1, 2)

    def forward(self, u: Tensor, seqlen: Optional[int] = None, seq_idx: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, inference_params=None, *,
                attention_mask: Optional[Tensor] = None, cp_context=None) -> Tensor:
        """u [B, L, d_model] (or [B * L, d_model] with seqlen=L) -> out of u's shape.
        seq_idx [B, L] int32: segment ids (no state or conv tap crosses a change).
        cu_seqlens [N + 1]: packed sequences in a [1, L] batch, each with its own state.
        inference_params: prefill (seqlen_offset 0) or continue (> 0) the cached states of
        `key_value_memory_dict[layer_idx]`, updated in place.
        cp_context (from `lightning_ops.cp.build_cp_context`): context parallelism, u is this
        rank's slice of the sequence dim and out the same slice of the output (see
        `RecurrentMixer.mix`); not with seq_idx, cu_seqlens, attention_mask or
        inference_params."""
        flat = seqlen is not None
        if flat:
            if u.dim() != 2 or u.shape[0] % seqlen:
                raise ValueError(f"Mamba2: with seqlen={seqlen}, u must have shape "
                                 f"[batch * seqlen, d_model], got {list(u.shape)}")
            u = u.view(u.shape[0] // seqlen, seqlen, u.shape[1])
        out = self._run(u, inference_params, attention_mask, cu_seqlens, seq_idx, cp_context)
        return out.reshape(-1, out.shape[-1]) if flat else out

    def _mix(self, u: Tensor, step: MixerStep):
        b, l, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z0, x0, z, xBC, dt = self.in_proj(u).split(
            [self.d_mlp, self.d_mlp, self.d_ssm, self.d_ssm + 2 * g * n, h], dim=-1)
        x, B, C = split_xbc(step.conv(self.conv1d, xBC), h, p, g, n)
        z = z.reshape(b, l, h, p)
        cd = compute_dtype(u)
        A = decay_rate(self.A_log, cd)
        D = self.D.to(cd).view(h, p) if self.D_has_hdim else self.D.to(cd)
        # dt processed here when masking or decoding: dt = 0 on padding means no decay and no
        # input there, which the op's own clamp(softplus(dt + bias)) could not give
        decode = step.is_decode(l)
        pre = step.mask is not None or decode
        if pre:
            dt = apply_mask(softplus_dt(dt, self.dt_bias, cd, self.dt_limit), step.mask)
        gate = None if self.rmsnorm else z
        if decode:
            state = _decode_state(step.state, True)
            y = lo.selective_state_update(
                state, x[:, 0], dt[:, 0, :, None].expand(b, h, p),
                A[:, None, None].expand(h, p, n), B[:, 0], C[:, 0],
                D[:, None].expand(h, p) if D.dim() == 1 else D,
                None if gate is None else gate[:, 0])[:, None]
        else:
            res = step.op(self, x, "mamba_chunk_scan_combined")(
                x, dt, A, B, C, self.chunk_size, D=D, z=gate,
                dt_bias=None if pre else self.dt_bias.to(cd), initial_states=step.state,
                seq_idx=step.seq_idx, cu_seqlens=step.cu_seqlens, dt_softplus=not pre,
                dt_limit=NO_DT_LIMIT if pre else self.dt_limit,
                return_final_states=step.want_state)
            y, state = res if step.want_state else (res, None)
        y = y.reshape(b, l, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z.reshape(b, l, self.d_ssm))
        if self.d_mlp:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return apply_mask(self.out_proj(y), step.mask), state
