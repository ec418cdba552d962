"""Mamba (Gu & Dao, 2023) and Mamba-2 (Dao & Gu, 2024) mixer blocks, as in mamba-ssm."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ops
from .base import MixerStep, RecurrentMixer
from .conv import ShortConvolution
from .norm import RMSNorm
from .utils import apply_mask, init_dt_bias, repack, unpack_left

Tensor = torch.Tensor


def _no_weight_decay(*params: nn.Parameter) -> None:
    for p in params:
        p._no_weight_decay = True


def _decode_state(state: Tensor, single_token: bool) -> Tensor:
    """selective_state_update works in place. A one-token decode step under no_grad (inference)
    updates the cache's own tensor, as mamba-ssm does (no copy of a large state per token);
    anything else works on a copy (autograd needs the old value; multi-token calls leave the
    caller's cache intact)."""
    return state if single_token and not torch.is_grad_enabled() else state.clone()


class Mamba(RecurrentMixer):
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
    A_log = log([1..d_state]) per channel (S4D-real), D = 1: float32, no weight decay.
    Incremental decoding (one token with a cache) uses selective_state_update; a multi-token
    call that continues a cache steps token by token (selective_scan_fn takes no initial
    state).
    """

    def __init__(self, d_model: int = 1024, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, layer_idx: Optional[int] = None,
                 hidden_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
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
        _no_weight_decay(self.A_log, self.D)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.d_inner, self.d_state)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.conv1d]

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
        A = -self.A_log.float().exp()
        D, dt_bias = self.D.float(), self.dt_proj.bias.float()
        softplus = True
        if step.mask is not None:
            # dt = 0 on padding: no decay and no input there (exp(0 A) = 1, 0 * B x = 0)
            dt = apply_mask(F.softplus(dt.float() + dt_bias), step.mask).to(x.dtype)
            dt_bias, softplus = None, False
        if step.has_history:  # continue the cached state token by token
            state = _decode_state(step.state, x.shape[1] == 1)
            ys = [_ops.selective_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D,
                                              z[:, t], dt_bias, softplus)
                  for t in range(x.shape[1])]
            y = torch.stack(ys, dim=1)
        else:
            def cf(t):  # [B, L, D] -> contiguous [B, D, L], mamba-ssm's layout
                return t.transpose(1, 2).contiguous()
            res = _ops.selective_scan_fn(cf(x), cf(dt), A, cf(B), cf(C), D, cf(z), dt_bias,
                                         softplus, return_last_state=step.want_state)
            y, state = res if step.want_state else (res, None)
            y = y.transpose(1, 2)
        return apply_mask(self.out_proj(y), step.mask), state


class Mamba2(RecurrentMixer):
    """The Mamba-2 mixer block (SSD), as mamba-ssm's `Mamba2` (same argument names, defaults,
    parameter names and init):

        z, xBC, dt = in_proj(u);  x, B, C = silu(conv1d(xBC))
        y = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, softplus);  y = norm(y, gate=z)
        out = out_proj(y)

    Args:
        d_model (alias hidden_size): model width.
        d_state: state size N per head.
        d_conv: width of the causal depthwise conv on xBC (2..4).
        expand: d_inner = expand * d_model.
        headdim: head dim P (nheads = d_inner / headdim).
        ngroups: groups of heads sharing B and C.
        A_init_range: A ~ U(A_init_range), stored as A_log (float32, no weight decay).
        D_has_hdim: D per channel [d_inner] instead of per head [nheads].
        rmsnorm, norm_before_gate: gated RMSNorm of y (else y * silu(z) in the op).
        dt_min, dt_max, dt_init_floor: softplus(dt_bias) log-uniform in [dt_min, dt_max].
        dt_limit: clamp of dt after the softplus.
        bias, conv_bias: biases of in_proj / out_proj and conv1d.
        chunk_size: SSD chunk length (a power of two).
    """

    def __init__(self, d_model: int = 1024, d_state: int = 128, d_conv: int = 4,
                 expand: int = 2, headdim: int = 64, ngroups: int = 1,
                 A_init_range: Tuple[float, float] = (1, 16), D_has_hdim: bool = False,
                 rmsnorm: bool = True, norm_before_gate: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit: Tuple[float, float] = (0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, layer_idx: Optional[int] = None,
                 hidden_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        d_model = hidden_size if hidden_size is not None else d_model
        self.d_model = self.hidden_size = d_model
        self.d_state, self.d_conv, self.expand, self.headdim = d_state, d_conv, expand, headdim
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"d_inner = expand * d_model = {self.d_inner} must be divisible by "
                             f"headdim {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups {ngroups} must divide the {self.nheads} heads")
        if chunk_size < 1 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.ngroups, self.D_has_hdim, self.rmsnorm = ngroups, D_has_hdim, rmsnorm
        self.dt_limit, self.chunk_size, self.layer_idx = tuple(dt_limit), chunk_size, layer_idx
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.nheads, bias=bias, **kw)
        self.conv1d = ShortConvolution(conv_dim, d_conv, conv_bias, "silu", **kw)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor,
                                                 device))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads,
                                         device=device))
        _no_weight_decay(self.dt_bias, self.A_log, self.D)
        if rmsnorm:
            self.norm = RMSNorm(self.d_inner, 1e-5, group_size=self.d_inner // ngroups,
                                gate_fn="silu", norm_before_gate=norm_before_gate, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)

    def state_shape(self) -> Tuple[int, ...]:
        return (self.nheads, self.headdim, self.d_state)

    def conv_layers(self) -> List[ShortConvolution]:
        return [self.conv1d]

    def _mix(self, u: Tensor, step: MixerStep):
        b, l, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * g * n, h], dim=-1)
        xBC = step.conv(self.conv1d, xBC)
        x, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        x, B, C = x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
        z = z.view(b, l, h, p)
        A = -self.A_log.float().exp()
        D = self.D.float().view(h, p) if self.D_has_hdim else self.D.float()
        # dt processed here (fp32) when masking or decoding: dt = 0 on padding means no decay
        # and no input there, which the op's own clamp(softplus(dt + bias)) could not give
        pre = step.mask is not None or (step.has_history and l == 1)
        if pre:
            dt = F.softplus(dt.float() + self.dt_bias.float())
            if self.dt_limit != (0.0, float("inf")):
                dt = dt.clamp(*self.dt_limit)
            dt = apply_mask(dt, step.mask)
        gate = None if self.rmsnorm else z
        if step.has_history and l == 1 and step.cu_seqlens is None:
            state = _decode_state(step.state, True)
            y = _ops.selective_state_update(
                state, x[:, 0], dt[:, 0, :, None].expand(b, h, p),
                A[:, None, None].expand(h, p, n), B[:, 0], C[:, 0],
                D[:, None].expand(h, p) if D.dim() == 1 else D,
                None if gate is None else gate[:, 0])[:, None]
        else:
            res = _ops.mamba_chunk_scan_combined(
                x, dt, A, B, C, self.chunk_size, D=D, z=gate,
                dt_bias=None if pre else self.dt_bias.float(), initial_states=step.state,
                cu_seqlens=step.cu_seqlens, dt_softplus=not pre,
                dt_limit=(0.0, float("inf")) if pre else self.dt_limit,
                return_final_states=step.want_state)
            y, state = res if step.want_state else (res, None)
        y = y.reshape(b, l, self.d_inner)
        if self.rmsnorm:
            y = self.norm(y, z.reshape(b, l, self.d_inner))
        return apply_mask(self.out_proj(y), step.mask), state
