"""The registry: every benchmarked op, its inputs, providers, shapes and cost model, in ONE place.

Used by the CLI (`python -m benchmarks`) and by pytest-benchmark (tests/benchmarks). Nothing here
times anything; timing.py does.

Shapes. A run is described by a model config `Config(B, T, H, K, V)`; each op maps it to its own
layout (`OpSpec.dims`) so one row of the table compares like with like:
  * GLA / delta ops (chunk_kda: per-channel gate g [B, T, H, K]), lion_attn and SDPA:
    q, k [B, T, H, K], v [B, T, H, V]
  * chunk_log_linear_attn: fla's log-linear Mamba-2 form, q, k [B, T, 1, K] (one q/k group shared
    by the H value heads, as fla's kernel requires), v [B, T, H, V], g [B, T, H], level_scales
    [B, T, H, L] with L = bit_length(T - 1) + 1 levels (every level a query at position < T can
    reach; fla's kernel reaches the same ones); keys L2-normalised (the op's scale is 1)
  * selective_scan_fn (Mamba-1): u, delta, z [B, D, L] with D = H*V channels, N = 16 states
  * mamba_chunk_scan_combined (Mamba-2 SSD): x [B, L, h, p] with p = min(V, 64) (Mamba-2 head dim),
    h = H*V/p heads, n = K states, one group, chunk_size = cfg.ssd_chunk (256, Mamba-2's default)
  * causal_conv1d_fn: x [B, D, L] with D = H*V channels, width W = 4, SiLU
  * chunk_log_linear_gated_delta_rule: chunk_log_linear_attn's inputs and beta [B, T, H]
  * decode steps (one token per sequence, `OpSpec.decode`: timed once per run at T = 1, forward
    only, the state updated in place or returned): selective_state_update as Mamba2.step calls it
    (state [B, h, p, n] fp32 with SSD's h, p, n; A, dt, dt_bias, D expanded over p (and n) with
    stride 0 from [h] / [B, h]; z = None, as with Mamba-2's gated RMSNorm), causal_conv1d_update
    (x [B, D], conv_state [B, D, W], Mamba's d_conv), fused_recurrent_gated_delta_rule (q, k
    [B, 1, H, K], the fp32 state [B, H, K, V] in, the new one out)
Inputs are random and never zero; gates are realistic decays (logsigmoid of randn), delta-rule keys
are L2-normalised (as models feed them), Mamba parameters follow Mamba's init. Parameters that
mamba-ssm requires in fp32 (A, D, dt_bias, delta_bias) and lightning's slope are fp32; everything
else is in the benchmark dtype.

Cost model (what GB/s, % of floor, TFLOP/s are computed from; tests check them by hand):
  BYTES, the memory floor: every input read once + every output written once, at their dtypes.
    fwd     = sum(inputs) + output
    bwd     = sum(inputs) + d(output) + sum(gradients of the differentiable inputs)
    fwd+bwd = fwd + bwd
  FLOPS, matmul work of the chunked algorithm (element-wise work ignored), per (batch, head),
  chunk C (64 for GLA/delta), causal blocks counted as half:
    linear attn / simple GLA / lightning / GLA:  4*T*K*V + T*C*(K+V)
        (state update k^T v and inter-chunk q S: 2*T*K*V each; intra-chunk q k^T and A v)
    delta / gated delta rule / KDA:  6*T*K*V + T*C*(3K+2V) + T*C^2/3
        (the above, plus the WY transform: beta k k^T, the triangular solve C^3/3 per chunk,
         w = A (beta k), u = A (beta v), and the state correction u - w S: 2*T*K*V; KDA's
         per-channel gate only scales rows and columns: element-wise work, not counted)
    log-linear attention:  2*T*K*V + 2*C*K*V*P + T*C*(K+V),  P = sum over chunks a < ceil(T/C)
        of popcount(a)  (the chunk's own state k^T v; the query chunk a reads one K x V level
        state per set bit of a, as fla's kernel and ours; the lambda-weighted intra-chunk
        scores and A v as linear attention's; level merges are additions)
    lion_attn (bidirectional, LION-S gates):  2 x the linear-attention count
        (it is one causal chunk call on the sequence stacked with its time reversal)
    SDPA causal:  T^2 * (K+V)   (FlashAttention's convention, causal half of 4*T^2*D)
    SDPA non-causal (the baseline of bidirectional ops):  2*T^2*(K+V)
    SSD (Mamba-2):  the linear-attention count with K=n, V=p, C=chunk_size, per (batch, head)
    selective scan:  9*B*L*D*N + B*D*L (D skip) + B*D*L (z gate)   (mamba-ssm's own count)
    causal conv1d:  2*B*D*L*W
    log-linear gated delta rule:  the log-linear count + the WY transform T*C*(2K+V) + T*C^2/3
        (beta k k^T, the triangular solve, w and u, as the delta rule's) + T*C*K (the effective
        queries q e^b - P w) + 2*T*K^2 (each chunk's K x K transition e^b I - kd^T w) + 2*K^2*V*P
        (every level state passes each chunk through that transition)
    decode steps (matrix-vector work, 2 per multiply-add, the decay multiply 1):
        selective_state_update 5*B*h*p*n, causal_conv1d_update 2*B*D*W,
        fused_recurrent_gated_delta_rule 7*B*H*K*V (decay, k^T S, the rank-1 update, q^T S)
    Bytes of a decode step also count the state it writes (`OpSpec.writes`) once more; inputs
    passed as stride-0 expansions count at their stored size.
  bwd = 2 x fwd for every op (the usual convention: two matmuls per forward matmul), except
  SDPA where bwd = 2.5 x fwd (FlashAttention's convention: 5 matmuls vs 2).

Providers (PROVIDERS):
  ours-torch, ours-triton, ours-cuda   lightning_ops' backends (lightning_ops.backend)
  sdpa                                 torch's scaled_dot_product_attention, the baseline of the
                                       q/k/v ops (causal; non-causal for bidirectional ones)
  fla, mamba-ssm, causal-conv1d        the peers' fast kernels (`OpSpec.peers`), CUDA only
  fla-naive, mamba-ref, conv1d-ref     the peers' own pure-PyTorch references (`OpSpec.peer_refs`,
                                       PEER_REFS), on any device: fla 0.6.0's naive ops
                                       (fla.ops.<op>.naive), mamba-ssm's selective_scan_ref,
                                       ssd_minimal_discrete and selective_state_update_ref,
                                       causal-conv1d's causal_conv1d_ref and
                                       causal_conv1d_update_ref; called from the installed
                                       packages (never copied here), each through an adapter
                                       written below that maps our layout onto theirs. Optional:
                                       `make peers` installs them into .venv on a CPU machine
                                       (`pip install .[peers]` names them); without them a run
                                       notes "<provider> skipped: not installed: <package> ...".
                                       On by default on CPU only (`--provider` asks for them on
                                       GPU, where the fast kernels are the comparison).
  reference                            lightning_ops.reference (float64 spec; only when asked)
mamba-ssm and causal-conv1d import their CUDA extensions (selective_scan_cuda, causal_conv1d_cuda)
at the top of their packages, so a CPU install (built with MAMBA_SKIP_CUDA_BUILD /
CAUSAL_CONV1D_SKIP_CUDA_BUILD) cannot import even their pure-PyTorch modules; the import here
stands a placeholder module in for a missing extension while the package imports (it raises if
anything touches it; the references never do) and removes it from sys.modules afterwards.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import sys
import types
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
GLA_CHUNK = 64  # chunk size the GLA / delta FLOP counts assume (fla's and ours)


@dataclass(frozen=True)
class Config:
    """A model config; every op derives its own tensor dims from it (see OpSpec.dims)."""
    B: int
    T: int
    H: int
    K: int
    V: int
    ssd_chunk: int = 256

    def with_T(self, T: int) -> "Config":
        return replace(self, T=T)


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor: its dims (names looked up in OpSpec.dims, or ints), how it is filled,
    whether it takes a gradient, and whether it is an fp32 parameter (else: benchmark dtype).
    `expand`: the dims the op receives it with, a stride-0 expansion of the stored tensor over
    trailing dims (as Mamba2.step passes A, dt, dt_bias and D); the cost model counts the stored
    dims. For inputs without gradient (decode steps)."""
    name: str
    dims: Tuple[Any, ...]
    init: str = "randn"
    grad: bool = True
    fp32: bool = False
    expand: Optional[Tuple[Any, ...]] = None


def _fill(init: str, shape: Tuple[int, ...], gen: torch.Generator, device) -> torch.Tensor:
    """float32 values for one init kind, made on `device` (host-side generation of GPU-sized
    inputs would dominate the run); cast by make_inputs."""
    def rand():
        return torch.rand(shape, generator=gen, device=device, dtype=torch.float32)

    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if init == "randn":
        return x
    if init == "unit":  # L2-normalised rows (delta-rule keys, as models feed them)
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    if init == "logsigmoid":  # realistic log decays, all < 0
        return F.logsigmoid(x)
    if init == "sigmoid":  # delta-rule beta in (0, 1)
        return torch.sigmoid(x)
    if init == "softplus":  # positive weights (log-linear level scales, softplus of a projection)
        return F.softplus(x)
    if init == "slope":  # ALiBi / Lightning slopes 2^(-8(h+1)/H), positive
        H = shape[0]
        return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=device)
    if init == "mamba_A":  # A = -(1..N) per channel (Mamba-1 init), or -U(1, 16) per head
        if len(shape) == 2:
            return -torch.arange(1, shape[1] + 1, device=device, dtype=torch.float32
                                 ).expand(shape).clone()
        return -(1 + 15 * rand())
    if init == "dt_bias":  # inverse softplus of dt ~ logU(1e-3, 1e-1) (Mamba init)
        dt = torch.exp(rand() * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))
    if init == "small":  # pre-softplus dt activations around the bias
        return 0.5 * x
    raise ValueError(f"unknown init {init!r}")


@dataclass(frozen=True)
class PeerRef:
    """A peer's pure-PyTorch reference of an op, called from its installed package: `module.attr`
    through `adapt(fn, inputs, kwargs)`, which maps our inputs (the op's layout) onto the peer's
    signature and its result back onto our layout (main output first). `max_T`: a reference
    quadratic in T (T x T tensors) is not timed above this T."""
    module: str
    attr: str
    adapt: Callable[[Callable, Dict[str, torch.Tensor], Dict[str, Any]], Any]
    max_T: Optional[int] = None


@dataclass
class OpSpec:
    name: str
    family: Optional[str]              # lightning_ops.backend family; None: not ours (SDPA)
    tensors: Tuple[TensorSpec, ...]
    output: Tuple[str, ...]            # dims of the main output (the one we backprop through)
    dims: Callable[[Config], Dict[str, int]]
    flops_fwd: Callable[[Dict[str, int]], int]
    label: Callable[[Dict[str, int]], str]
    reference: Callable[..., Any]      # (inputs: dict, kwargs: dict) -> output(s), float64 spec
    kwargs: Callable[[Dict[str, int]], Dict[str, Any]] = lambda d: {}
    bwd_factor: float = 2.0
    attention_like: bool = False       # causal q/k/v layout: causal SDPA is a baseline for it
    bidirectional: bool = False        # non-causal q/k/v layout: non-causal SDPA is its baseline
    peers: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # provider -> (module, attr)
    # the peers' pure-PyTorch references: provider (PEER_REFS) -> PeerRef
    peer_refs: Dict[str, "PeerRef"] = field(default_factory=dict)
    modes: Tuple[str, ...] = MODES     # the modes it has (decode steps: fwd only)
    decode: bool = False               # one token per sequence: timed at T = 1, once per run
    writes: Tuple[str, ...] = ()       # inputs it writes back (a decode state): bytes count them

    # -- shapes ---------------------------------------------------------------------------------
    def shape_of(self, spec_dims: Sequence[Any], d: Dict[str, int]) -> Tuple[int, ...]:
        return tuple(x if isinstance(x, int) else d[x] for x in spec_dims)

    def make_inputs(self, cfg: Config, dtype: torch.dtype, device, seed: int = 0,
                    grad: bool = False) -> Dict[str, torch.Tensor]:
        """Random inputs (same values for every provider given the same seed). With grad=True
        the differentiable ones are leaves that require grad."""
        d = self.dims(cfg)
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        out = {}
        for s in self.tensors:
            x = _fill(s.init, self.shape_of(s.dims, d), gen, device)
            dt = torch.float32 if (s.fp32 and dtype != torch.float64) else dtype
            x = x.to(dtype=dt).requires_grad_(grad and s.grad)
            if s.expand is not None:
                full = self.shape_of(s.expand, d)
                x = x.reshape(x.shape + (1,) * (len(full) - x.dim())).expand(full)
            out[s.name] = x
        return out

    # -- cost model (documented in the module docstring) ----------------------------------------
    def bytes(self, cfg: Config, dtype: torch.dtype, mode: str) -> int:
        d = self.dims(cfg)
        e = torch.finfo(dtype).bits // 8
        size = {s.name: math.prod(self.shape_of(s.dims, d)) *
                (4 if (s.fp32 and dtype != torch.float64) else e) for s in self.tensors}
        inputs = sum(size.values())
        out = math.prod(self.shape_of(self.output, d)) * e + sum(size[n] for n in self.writes)
        grads = sum(size[s.name] for s in self.tensors if s.grad)
        fwd, bwd = inputs + out, inputs + out + grads
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def flops(self, cfg: Config, mode: str) -> float:
        f = float(self.flops_fwd(self.dims(cfg)))
        return {"fwd": f, "bwd": self.bwd_factor * f, "fwd+bwd": (1 + self.bwd_factor) * f}[mode]

    def tokens(self, cfg: Config) -> int:
        return cfg.B * cfg.T

    def shape_label(self, cfg: Config) -> str:
        return self.label(self.dims(cfg))


def main_output(result) -> torch.Tensor:
    """The tensor we time and backprop through: ops return o, or (o, final_state)."""
    return result[0] if isinstance(result, (tuple, list)) else result


# ------------------------------------------------------------------------------------------------
# The ops
# ------------------------------------------------------------------------------------------------
def _qkv_dims(cfg: Config) -> Dict[str, int]:
    return dict(B=cfg.B, T=cfg.T, H=cfg.H, K=cfg.K, V=cfg.V)


def _qkv_label(d) -> str:
    return f"B{d['B']} T{d['T']} H{d['H']} K{d['K']} V{d['V']}"


def _linear_flops(d) -> int:
    return d["B"] * d["H"] * (4 * d["T"] * d["K"] * d["V"] + d["T"] * GLA_CHUNK * (d["K"] + d["V"]))


def _delta_flops(d) -> int:
    T, K, V, C = d["T"], d["K"], d["V"], GLA_CHUNK
    return d["B"] * d["H"] * (6 * T * K * V + T * C * (3 * K + 2 * V) + T * C * C // 3)


Q = TensorSpec("q", ("B", "T", "H", "K"))
KK = TensorSpec("k", ("B", "T", "H", "K"))
KU = TensorSpec("k", ("B", "T", "H", "K"), init="unit")
VV = TensorSpec("v", ("B", "T", "H", "V"))
QKV_OUT = ("B", "T", "H", "V")


def _ref(name):
    """A reference-spec function, looked up when called (reference.py is another engineer's)."""
    def call(inputs, kwargs, _fn=name):
        from lightning_ops import reference
        return getattr(reference, _fn)(**inputs, **kwargs)
    return call


def _sdpa_ref(inputs, kwargs, causal=True):
    """Plain softmax attention (the math SDPA computes), [B, H, T, D] layout; causal unless
    told."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    T = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _sdpa_full_ref(inputs, kwargs):
    return _sdpa_ref(inputs, kwargs, causal=False)


def _ssd_dims(cfg: Config) -> Dict[str, int]:
    p = min(cfg.V, 64)
    return dict(B=cfg.B, L=cfg.T, h=cfg.H * cfg.V // p, p=p, n=cfg.K, g=1, C=cfg.ssd_chunk)


def _ssd_ref(inputs, kwargs):
    from lightning_ops import reference
    kw = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    return reference.ssd_ref(**inputs, **kw)


def _ssd_flops(d) -> int:
    T, n, p = d["L"], d["n"], d["p"]
    return d["B"] * d["h"] * (4 * T * n * p + T * d["C"] * (n + p))


def _mamba1_dims(cfg: Config) -> Dict[str, int]:
    return dict(B=cfg.B, D=cfg.H * cfg.V, N=16, L=cfg.T)


def _conv_dims(cfg: Config) -> Dict[str, int]:
    return dict(B=cfg.B, D=cfg.H * cfg.V, L=cfg.T, W=4)


def _loglinear_dims(cfg: Config) -> Dict[str, int]:
    """One q/k group (G = 1, fla's log-linear Mamba-2 form), the levels T positions reach."""
    return dict(B=cfg.B, T=cfg.T, G=1, H=cfg.H, K=cfg.K, V=cfg.V,
                L=max(cfg.T - 1, 0).bit_length() + 1)


def _loglinear_flops(d) -> int:
    T, K, V, C = d["T"], d["K"], d["V"], GLA_CHUNK
    reads = sum(bin(a).count("1") for a in range(-(-T // C)))  # level states read, all chunks
    return d["B"] * d["H"] * (2 * T * K * V + 2 * C * K * V * reads + T * C * (K + V))


def _loglinear_label(d) -> str:  # L is a function of T (see _loglinear_dims): not in the label
    return f"B{d['B']} T{d['T']} G{d['G']} H{d['H']} K{d['K']} V{d['V']}"


def _loglinear_delta_flops(d) -> int:
    T, K, V, C = d["T"], d["K"], d["V"], GLA_CHUNK
    reads = sum(bin(a).count("1") for a in range(-(-T // C)))
    return _loglinear_flops(d) + d["B"] * d["H"] * (
        T * C * (2 * K + V) + T * C * C // 3 + T * C * K + 2 * T * K * K + 2 * K * K * V * reads)


def _ssd_step_dims(cfg: Config) -> Dict[str, int]:
    """A Mamba-2 decode step: SSD's heads (h, p, n, one group), no sequence."""
    d = _ssd_dims(cfg)
    return dict(B=d["B"], h=d["h"], p=d["p"], n=d["n"], g=d["g"])


def _step_dims(cfg: Config) -> Dict[str, int]:
    """A q/k/v decode step: one token."""
    return dict(B=cfg.B, T=1, H=cfg.H, K=cfg.K, V=cfg.V)


# ------------------------------------------------------------------------------------------------
# The peers' pure-PyTorch references (providers fla-naive, mamba-ref, conv1d-ref): adapters from
# our layout to theirs. Their signatures are those of fla 0.6.0, mamba-ssm 2.3.2 and causal-conv1d
# 1.7.0; the chunked ones take chunk 64 (fla's and our torch chunk; SSD: see _mamba_ssd).
# ------------------------------------------------------------------------------------------------
PEER_CHUNK = 64


def _pad_T(x: torch.Tensor, mult: int, dim: int = 1) -> torch.Tensor:
    """x zero-padded at the end of `dim` to a multiple of `mult` (the references that require
    one; zero keys, values, betas and log gates after the last token change no earlier output)."""
    n = (-x.shape[dim]) % mult
    if n == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, n]
    return F.pad(x, pad)


def _same_signature(fn, inputs, kwargs):
    """The peer's reference takes our (= its fast op's) signature as it is."""
    return fn(**inputs, **kwargs)


def _fla_gla(fn, inputs, kwargs):
    """fla.ops.gla.naive.naive_recurrent_gla(q, k, v, gk): token by token (fla 0.6.0 has no
    naive chunked GLA)."""
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"])


def _fla_simple_gla(fn, inputs, kwargs):
    """naive_chunk_simple_gla(q, k, v, g, chunk_size=64): pads T itself; o in fp32."""
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], chunk_size=PEER_CHUNK)


def _fla_lightning(fn, inputs, kwargs):
    """Lightning attention is simple GLA with the constant log decay -slope[h] (fla's
    lightning_attn passes it as g_gamma): naive_chunk_simple_gla with g = -slope for every
    token."""
    q = inputs["q"]
    g = (-inputs["slope"]).to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2])
    return fn(q, inputs["k"], inputs["v"], g, chunk_size=PEER_CHUNK)


def _fla_linear(fn, inputs, kwargs):
    """naive_chunk_linear_attn(q, k, v): chunk 64, T a multiple of it (padded here)."""
    T = inputs["q"].shape[1]
    q, k, v = (_pad_T(inputs[n], PEER_CHUNK) for n in ("q", "k", "v"))
    return fn(q, k, v)[:, :T]


def _fla_delta(fn, inputs, kwargs):
    """fla.ops.delta_rule.naive.delta_rule_chunkwise(q, k, v, beta, chunk_size): [B, H, T, D]
    layout, T a multiple of the chunk (padded here); it computes in the input dtype."""
    T = inputs["q"].shape[1]
    q, k, v, beta = (_pad_T(inputs[n], PEER_CHUNK).transpose(1, 2)
                     for n in ("q", "k", "v", "beta"))
    o, S = fn(q, k, v, beta, chunk_size=PEER_CHUNK)
    return o.transpose(1, 2)[:, :T], S


def _fla_gated_delta(fn, inputs, kwargs):
    """naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64): pads T itself."""
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
              chunk_size=PEER_CHUNK)


def _fla_kda(fn, inputs, kwargs):
    """naive_chunk_kda(q, k, v, g, beta, chunk_size=64): T a multiple of the chunk (padded)."""
    T = inputs["q"].shape[1]
    q, k, v, g, beta = (_pad_T(inputs[n], PEER_CHUNK) for n in ("q", "k", "v", "g", "beta"))
    o, S = fn(q, k, v, g, beta, chunk_size=PEER_CHUNK)
    return o[:, :T], S


def _fla_log_linear(fn, inputs, kwargs):
    """naive_log_linear_attn(q, k, v, g, level_scales, scale=1.0): the dense T x T form (levels
    0..ceil(log2 T), the L of our row)."""
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["level_scales"],
              scale=1.0)


def _fla_gated_delta_step(fn, inputs, kwargs):
    """One decode token: naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state,
    output_final_state) (note its beta-before-g order)."""
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["g"],
              initial_state=inputs["initial_state"],
              output_final_state=kwargs.get("output_final_state", False))


def _mamba_ssd(fn, inputs, kwargs):
    """mamba-ssm's ssd_minimal_discrete(X, A, B, C, block_len), as its own tests call it against
    mamba_chunk_scan_combined: X = x dt, A = A dt ([b, l, h], dt after dt_bias and softplus),
    B, C per head [b, l, h, n] (groups repeated), block_len 64, L padded to a multiple of it;
    the D skip added here (the minimal form has none). One dtype throughout (it asserts it):
    fp32."""
    x, dt, A = inputs["x"], inputs["dt"].float(), inputs["A"].float()
    if inputs.get("dt_bias") is not None:
        dt = dt + inputs["dt_bias"].float()
    if kwargs.get("dt_softplus"):
        dt = F.softplus(dt)
    L, h = x.shape[1], x.shape[2]
    rep = h // inputs["B"].shape[2]
    B = inputs["B"].float().repeat_interleave(rep, dim=2)
    C = inputs["C"].float().repeat_interleave(rep, dim=2)
    X = x.float() * dt[..., None]
    X, Ad, B, C = (_pad_T(t, PEER_CHUNK) for t in (X, A * dt, B, C))
    y, _ = fn(X, Ad, B, C, PEER_CHUNK)
    y = y[:, :L]
    if inputs.get("D") is not None:
        D = inputs["D"].float()
        y = y + x.float() * (D[:, None] if D.dim() == 1 else D)
    return y.to(x.dtype)


# The package each provider needs, its distribution (what `pip install` names) and the CUDA
# extension modules it imports at its top level (absent from a CPU build).
PEER_REF_PACKAGES: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "fla-naive": ("fla", "fla-core", ()),
    "mamba-ref": ("mamba_ssm", "mamba-ssm", ("selective_scan_cuda",)),
    "conv1d-ref": ("causal_conv1d", "causal-conv1d", ("causal_conv1d_cuda",)),
}
PEERS_HINT = "optional: `make peers`, or pip install .[peers]"
_REF_CACHE: Dict[Tuple[str, str], Tuple[Optional[Callable], Optional[str]]] = {}


class _NotBuilt(types.ModuleType):
    """Stands in for a peer's CUDA extension while its package imports on a CPU install."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__} (a CUDA extension) is not built in this install: "
                           f"only the package's pure-PyTorch references can run")


def _peer_installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _import_peer_ref(package: str, dist: str, cuda_ext: Tuple[str, ...], module: str,
                     attr: str) -> Tuple[Optional[Callable], Optional[str]]:
    """(function, None) or (None, why not)."""
    if not _peer_installed(dist):
        return None, f"not installed: {dist} ({PEERS_HINT})"
    stand_ins = {}
    for name in cuda_ext:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stand_ins[name] = sys.modules[name] = _NotBuilt(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fla: "Triton is not supported ... roll back to CPU"
            fn = getattr(importlib.import_module(module), attr)
    except Exception as e:  # noqa: BLE001 - an optional extra: any failure means unavailable
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return None, f"{dist} is installed but {module}.{attr} does not import ({msg})"
    finally:
        for name, mod in stand_ins.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
    if str(getattr(fn, "__module__", "")).startswith("lightning_ops"):
        return None, (f"{module}.{attr} is lightning_ops' own (lightning_ops.compat has patched "
                      f"{package}), not the peer's code")
    return fn, None


def peer_ref_function(provider: str, op: "OpSpec") -> Tuple[Optional[Callable], Optional[str]]:
    """The peer's reference function of op, or (None, why not); imported once per process."""
    ref = op.peer_refs.get(provider)
    if ref is None:
        return None, f"{provider} has no reference of this op"  # (no op name: notes merge)
    key = (ref.module, ref.attr)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = _import_peer_ref(*PEER_REF_PACKAGES[provider], ref.module, ref.attr)
    return _REF_CACHE[key]


def peer_ref_status() -> List[str]:
    """One line per (provider, op): available, or why not (`make peers` prints it)."""
    lines = []
    for name, op in OPS.items():
        for p, ref in op.peer_refs.items():
            fn, why = peer_ref_function(p, op)
            lines.append(f"{p:11s} {name:34s} {ref.module}.{ref.attr}: "
                         + ("available" if fn is not None else why))
    return lines


_FLA = "fla.ops"
OPS: Dict[str, OpSpec] = {}


def _add(spec: OpSpec) -> None:
    OPS[spec.name] = spec


_add(OpSpec(
    "chunk_gla", "gla", (Q, KK, VV, TensorSpec("g", ("B", "T", "H", "K"), "logsigmoid")),
    QKV_OUT, _qkv_dims, _linear_flops, _qkv_label, _ref("gla_ref"), attention_like=True,
    peers={"fla": ("fla.ops.gla", "chunk_gla")},
    peer_refs={"fla-naive": PeerRef("fla.ops.gla.naive", "naive_recurrent_gla", _fla_gla)}))
_add(OpSpec(
    "chunk_simple_gla", "gla", (Q, KK, VV, TensorSpec("g", ("B", "T", "H"), "logsigmoid")),
    QKV_OUT, _qkv_dims, _linear_flops, _qkv_label, _ref("simple_gla_ref"), attention_like=True,
    peers={"fla": ("fla.ops.simple_gla", "chunk_simple_gla")},
    peer_refs={"fla-naive": PeerRef("fla.ops.simple_gla.naive", "naive_chunk_simple_gla",
                                    _fla_simple_gla)}))
_add(OpSpec(
    "chunk_linear_attn", "gla", (Q, KK, VV), QKV_OUT, _qkv_dims, _linear_flops, _qkv_label,
    _ref("linear_attn_ref"), attention_like=True,
    peer_refs={"fla-naive": PeerRef("fla.ops.linear_attn.naive", "naive_chunk_linear_attn",
                                    _fla_linear)}))
_add(OpSpec(
    "lightning_attn", "gla",
    (Q, KK, VV, TensorSpec("slope", ("H",), "slope", grad=False, fp32=True)),
    QKV_OUT, _qkv_dims, _linear_flops, _qkv_label, _ref("lightning_attn_ref"),
    attention_like=True,
    peer_refs={"fla-naive": PeerRef("fla.ops.simple_gla.naive", "naive_chunk_simple_gla",
                                    _fla_lightning)}))
_add(OpSpec(
    "chunk_delta_rule", "delta", (Q, KU, VV, TensorSpec("beta", ("B", "T", "H"), "sigmoid")),
    QKV_OUT, _qkv_dims, _delta_flops, _qkv_label, _ref("delta_rule_ref"), attention_like=True,
    peers={"fla": ("fla.ops.delta_rule", "chunk_delta_rule")},
    peer_refs={"fla-naive": PeerRef("fla.ops.delta_rule.naive", "delta_rule_chunkwise",
                                    _fla_delta)}))
_add(OpSpec(
    "chunk_gated_delta_rule", "delta",
    (Q, KU, VV, TensorSpec("g", ("B", "T", "H"), "logsigmoid"),
     TensorSpec("beta", ("B", "T", "H"), "sigmoid")),
    QKV_OUT, _qkv_dims, _delta_flops, _qkv_label, _ref("gated_delta_rule_ref"),
    attention_like=True,
    peers={"fla": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")},
    peer_refs={"fla-naive": PeerRef("fla.ops.gated_delta_rule.naive",
                                    "naive_chunk_gated_delta_rule", _fla_gated_delta)}))
_add(OpSpec(  # Kimi Delta Attention: the gated delta rule with a per-channel log decay
    "chunk_kda", "delta",
    (Q, KU, VV, TensorSpec("g", ("B", "T", "H", "K"), "logsigmoid"),
     TensorSpec("beta", ("B", "T", "H"), "sigmoid")),
    QKV_OUT, _qkv_dims, _delta_flops, _qkv_label, _ref("kda_ref"), attention_like=True,
    peers={"fla": ("fla.ops.kda", "chunk_kda")},
    peer_refs={"fla-naive": PeerRef("fla.ops.kda.naive", "naive_chunk_kda", _fla_kda)}))
_add(OpSpec(  # log-linear attention (Guo et al. 2025) over the scalar gate; Triton forward kernels
    "chunk_log_linear_attn", "loglinear",
    (TensorSpec("q", ("B", "T", "G", "K")), TensorSpec("k", ("B", "T", "G", "K"), "unit"),
     TensorSpec("v", ("B", "T", "H", "V")), TensorSpec("g", ("B", "T", "H"), "logsigmoid"),
     TensorSpec("level_scales", ("B", "T", "H", "L"), "softplus")),
    QKV_OUT, _loglinear_dims, _loglinear_flops, _loglinear_label, _ref("log_linear_attn_ref"),
    attention_like=True,
    peers={"fla": ("fla.ops.log_linear_attn", "chunk_log_linear_attn")},
    # the dense T x T form, its masks built level by level in Python: 18 s per forward at
    # T = 1024 on one busy core (its fwd+bwd past 60 s), quadratic in time and memory
    peer_refs={"fla-naive": PeerRef("fla.ops.log_linear_attn.naive", "naive_log_linear_attn",
                                    _fla_log_linear, max_T=512)}))
_add(OpSpec(  # log-linear Gated DeltaNet (Guo et al. 2025, sec. 3.3); Triton forward; no peer
    "chunk_log_linear_gated_delta_rule", "loglinear_delta",
    (TensorSpec("q", ("B", "T", "G", "K")), TensorSpec("k", ("B", "T", "G", "K"), "unit"),
     TensorSpec("v", ("B", "T", "H", "V")), TensorSpec("g", ("B", "T", "H"), "logsigmoid"),
     TensorSpec("level_scales", ("B", "T", "H", "L"), "softplus"),
     TensorSpec("beta", ("B", "T", "H"), "sigmoid")),
    QKV_OUT, _loglinear_dims, _loglinear_delta_flops, _loglinear_label,
    _ref("log_linear_gated_delta_rule_ref"), attention_like=True))
_add(OpSpec(
    "selective_scan_fn", "selective_scan",
    (TensorSpec("u", ("B", "D", "L")), TensorSpec("delta", ("B", "D", "L"), "small"),
     TensorSpec("A", ("D", "N"), "mamba_A", fp32=True), TensorSpec("B", ("B", "N", "L")),
     TensorSpec("C", ("B", "N", "L")), TensorSpec("D", ("D",), fp32=True),
     TensorSpec("z", ("B", "D", "L")), TensorSpec("delta_bias", ("D",), "dt_bias", fp32=True)),
    ("B", "D", "L"), _mamba1_dims,
    lambda d: 9 * d["B"] * d["L"] * d["D"] * d["N"] + 2 * d["B"] * d["D"] * d["L"],
    lambda d: f"B{d['B']} D{d['D']} N{d['N']} L{d['L']}", _ref("selective_scan_ref"),
    kwargs=lambda d: {"delta_softplus": True},
    peers={"mamba-ssm": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")},
    peer_refs={"mamba-ref": PeerRef("mamba_ssm.ops.selective_scan_interface",
                                    "selective_scan_ref", _same_signature)}))
_add(OpSpec(
    "mamba_chunk_scan_combined", "ssd",
    (TensorSpec("x", ("B", "L", "h", "p")), TensorSpec("dt", ("B", "L", "h"), "small"),
     TensorSpec("A", ("h",), "mamba_A", fp32=True), TensorSpec("B", ("B", "L", "g", "n")),
     TensorSpec("C", ("B", "L", "g", "n")), TensorSpec("D", ("h",), fp32=True),
     TensorSpec("dt_bias", ("h",), "dt_bias", fp32=True)),
    ("B", "L", "h", "p"), _ssd_dims, _ssd_flops,
    lambda d: f"B{d['B']} L{d['L']} h{d['h']} p{d['p']} n{d['n']} chunk{d['C']}", _ssd_ref,
    kwargs=lambda d: {"chunk_size": d["C"], "dt_softplus": True},
    peers={"mamba-ssm": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")},
    peer_refs={"mamba-ref": PeerRef("mamba_ssm.modules.ssd_minimal", "ssd_minimal_discrete",
                                    _mamba_ssd)}))
_add(OpSpec(
    "causal_conv1d_fn", "conv",
    (TensorSpec("x", ("B", "D", "L")), TensorSpec("weight", ("D", "W")),
     TensorSpec("bias", ("D",))),
    ("B", "D", "L"), _conv_dims, lambda d: 2 * d["B"] * d["D"] * d["L"] * d["W"],
    lambda d: f"B{d['B']} D{d['D']} L{d['L']} W{d['W']}", _ref("causal_conv1d_ref"),
    kwargs=lambda d: {"activation": "silu"},
    peers={"causal-conv1d": ("causal_conv1d", "causal_conv1d_fn")},
    peer_refs={"conv1d-ref": PeerRef("causal_conv1d.causal_conv1d_interface", "causal_conv1d_ref",
                                     _same_signature)}))
_add(OpSpec(  # LION-S (data-dependent gates); its baseline is non-causal SDPA
    "lion_attn", "gla", (Q, KK, VV, TensorSpec("g", ("B", "T", "H"), "logsigmoid")),
    QKV_OUT, _qkv_dims, lambda d: 2 * _linear_flops(d), _qkv_label, _ref("lion_ref"),
    bidirectional=True))

# Decode steps: one token per sequence, forward only, the state written (in place, or returned).
_STEP = dict(modes=("fwd",), decode=True)
_add(OpSpec(  # Mamba-2's decode step, with the arguments Mamba2.step passes
    "selective_state_update", "ssd",
    (TensorSpec("state", ("B", "h", "p", "n"), grad=False, fp32=True),
     TensorSpec("x", ("B", "h", "p"), grad=False),
     TensorSpec("dt", ("B", "h"), "small", grad=False, expand=("B", "h", "p")),
     TensorSpec("A", ("h",), "mamba_A", grad=False, fp32=True, expand=("h", "p", "n")),
     TensorSpec("B", ("B", "g", "n"), grad=False), TensorSpec("C", ("B", "g", "n"), grad=False),
     TensorSpec("D", ("h",), grad=False, fp32=True, expand=("h", "p")),
     TensorSpec("dt_bias", ("h",), "dt_bias", grad=False, fp32=True, expand=("h", "p"))),
    ("B", "h", "p"), _ssd_step_dims, lambda d: 5 * d["B"] * d["h"] * d["p"] * d["n"],
    lambda d: f"B{d['B']} h{d['h']} p{d['p']} n{d['n']} (one token)",
    _ref("selective_state_update_ref"), kwargs=lambda d: {"dt_softplus": True},
    writes=("state",), **_STEP,
    peer_refs={"mamba-ref": PeerRef("mamba_ssm.ops.triton.selective_state_update",
                                    "selective_state_update_ref", _same_signature)}))
_add(OpSpec(  # the decode step of causal_conv1d_fn (conv_state of Mamba's d_conv = W inputs)
    "causal_conv1d_update", "conv",
    (TensorSpec("x", ("B", "D"), grad=False),
     TensorSpec("conv_state", ("B", "D", "W"), grad=False),
     TensorSpec("weight", ("D", "W"), grad=False), TensorSpec("bias", ("D",), grad=False)),
    ("B", "D"), _conv_dims, lambda d: 2 * d["B"] * d["D"] * d["W"],
    lambda d: f"B{d['B']} D{d['D']} W{d['W']} (one token)", _ref("causal_conv1d_update_ref"),
    kwargs=lambda d: {"activation": "silu"}, writes=("conv_state",), **_STEP,
    peer_refs={"conv1d-ref": PeerRef("causal_conv1d.causal_conv1d_interface",
                                     "causal_conv1d_update_ref", _same_signature)}))
_add(OpSpec(  # Gated DeltaNet decode: one token from the fp32 state, the new state returned
    "fused_recurrent_gated_delta_rule", "delta",
    (TensorSpec("q", ("B", "T", "H", "K"), grad=False),
     TensorSpec("k", ("B", "T", "H", "K"), "unit", grad=False),
     TensorSpec("v", ("B", "T", "H", "V"), grad=False),
     TensorSpec("g", ("B", "T", "H"), "logsigmoid", grad=False),
     TensorSpec("beta", ("B", "T", "H"), "sigmoid", grad=False),
     TensorSpec("initial_state", ("B", "H", "K", "V"), grad=False, fp32=True)),
    QKV_OUT, _step_dims, lambda d: 7 * d["B"] * d["H"] * d["K"] * d["V"],
    lambda d: f"B{d['B']} H{d['H']} K{d['K']} V{d['V']} (one token)",
    _ref("gated_delta_rule_ref"), kwargs=lambda d: {"output_final_state": True},
    writes=("initial_state",), **_STEP,
    peer_refs={"fla-naive": PeerRef("fla.ops.gated_delta_rule.naive",
                                    "naive_recurrent_gated_delta_rule", _fla_gated_delta_step)}))

# The SDPA baseline: its own inputs (q/k/v in SDPA's [B, H, T, D] layout) and cost; it is shown
# under every attention-like op at the same (B, T, H, K, V).
SDPA = OpSpec(
    "sdpa_causal", None,
    (TensorSpec("q", ("B", "H", "T", "K")), TensorSpec("k", ("B", "H", "T", "K")),
     TensorSpec("v", ("B", "H", "T", "V"))),
    ("B", "H", "T", "V"), _qkv_dims,
    lambda d: d["B"] * d["H"] * d["T"] * d["T"] * (d["K"] + d["V"]), _qkv_label, _sdpa_ref,
    bwd_factor=2.5)
# ... and non-causal SDPA, the baseline of the bidirectional ops (lion_attn): twice the work.
SDPA_FULL = replace(
    SDPA, name="sdpa_full",
    flops_fwd=lambda d: 2 * d["B"] * d["H"] * d["T"] * d["T"] * (d["K"] + d["V"]),
    reference=_sdpa_full_ref)


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
OURS = ("ours-torch", "ours-triton", "ours-cuda")
PEERS = ("sdpa", "fla", "mamba-ssm", "causal-conv1d")
PEER_REFS = tuple(PEER_REF_PACKAGES)  # the peers' pure-PyTorch references (see the docstring)
PROVIDERS = OURS + PEERS + PEER_REFS + ("reference",)


def our_function(op: OpSpec) -> Tuple[Optional[Callable], Optional[str]]:
    """lightning_ops' public function for op, or (None, why not). A broken lightning_ops import
    raises: it is a bug, not a note."""
    import lightning_ops
    fn = getattr(lightning_ops, op.name, None)
    if fn is None:
        return None, f"lightning_ops has no public function {op.name}"
    return fn, None


def provider_missing(provider: str, op: OpSpec, device: torch.device) -> Optional[str]:
    """Why `provider` cannot run `op` on `device`, or None when it can."""
    if provider in OURS:
        if op.family is None:
            return "not a lightning_ops op"
        fn, why = our_function(op)
        if fn is None:
            return why
        backend = provider.split("-", 1)[1]
        from lightning_ops import backend as lob
        if backend not in lob.family_backends(op.family):
            return lob.missing(backend, device, op.family)  # "the X ops have no Y backend"
        if backend == "triton" and device.type != "cuda":
            return "Triton is benchmarked on CUDA only (the interpreter is for tests)"
        why = lob.missing(backend, device, op.family)
        if why is None:
            try:
                lob.implementation(op.family, backend)
            except Exception as e:  # noqa: BLE001
                why = str(e)
        return why
    if provider == "sdpa":
        return (None if op.attention_like or op.bidirectional
                else "SDPA is a baseline for q/k/v ops only")
    if provider == "reference":
        return None
    if provider in PEER_REFS:  # pure PyTorch: any device
        return peer_ref_function(provider, op)[1]
    if provider in op.peers:
        if device.type != "cuda":
            return f"{provider} runs on CUDA only"
        mod, attr = op.peers[provider]
        try:
            getattr(importlib.import_module(mod), attr)
        except Exception as e:  # noqa: BLE001 - an optional extra: any failure means absent
            return f"{provider} not importable ({type(e).__name__})"
        return None
    return f"{provider} has no {op.name}"


def provider_function(provider: str, op: OpSpec) -> Callable[[Dict[str, torch.Tensor], Dict], Any]:
    """(inputs, kwargs) -> result, for an available provider. The spec used for inputs and cost
    is `spec_for(provider, op)`."""
    if provider in OURS:
        from lightning_ops import use_backend
        fn, _ = our_function(op)
        backend = provider.split("-", 1)[1]

        def run(inputs, kwargs):
            with use_backend(backend):
                return fn(**inputs, **kwargs)
        return run
    if provider == "sdpa":
        causal = not op.bidirectional

        def run(inputs, kwargs):
            return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"],
                                                  is_causal=causal)
        return run
    if provider == "reference":
        return op.reference
    if provider in PEER_REFS:
        fn, why = peer_ref_function(provider, op)
        if fn is None:
            raise RuntimeError(why)
        adapt = op.peer_refs[provider].adapt
        return lambda inputs, kwargs: adapt(fn, inputs, kwargs)
    mod, attr = op.peers[provider]
    fn = getattr(importlib.import_module(mod), attr)
    return lambda inputs, kwargs: fn(**inputs, **kwargs)


def spec_for(provider: str, op: OpSpec) -> OpSpec:
    if provider == "sdpa":
        return SDPA_FULL if op.bidirectional else SDPA
    return op


# ------------------------------------------------------------------------------------------------
# Suites: which (op, config, providers, modes) a run measures
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    cfg: Config
    mode: str
    dtype: str

    @property
    def spec(self) -> OpSpec:
        return spec_for(self.provider, OPS[self.op])

    def key(self) -> Tuple:
        """Identity of a measurement; SDPA's is shared by every op at the same shape (causal and
        non-causal SDPA are two measurements)."""
        op = self.op
        if self.provider == "sdpa":
            op = "sdpa_full" if OPS[self.op].bidirectional else "sdpa"
        return (op, self.provider, self.cfg, self.mode, self.dtype)


@dataclass
class Suite:
    name: str
    device: str
    dtype: str
    modes: Tuple[str, ...]
    base: Config
    Ts: Tuple[int, ...]
    # rows beyond the grid: (op, provider, T, modes or () for the run's modes)
    extra: Tuple[Tuple[str, str, int, Tuple[str, ...]], ...] = ()
    err_cfg: Config = Config(B=1, T=100, H=2, K=32, V=48, ssd_chunk=32)
    max_case_s: float = 30.0   # skip a case predicted to take longer than this
    budget_s: float = 240.0    # the whole run from its start, leaving time for the report
    min_time_s: float = 0.3    # measured time per case at least (then until IQR < 10 % ...)
    max_time_s: float = 1.5    # ... or this much measured time
    once_over_s: float = 5.0   # a first call this slow is the only one (reported as such)
    round_s: float = 0.1       # time per provider per interleaved round (at least one call)


def suite(name: str) -> Suite:
    if name == "cpu":
        # the headline comparison: chunk_gla vs causal SDPA at T=16384 (the reference
        # recurrence takes minutes at T=4096: ask for it with --provider reference)
        extra = (("chunk_gla", "ours-torch", 16384, ()), ("chunk_gla", "sdpa", 16384, ()))
        return Suite("cpu", "cpu", "fp32", ("fwd", "fwd+bwd"), Config(1, 1024, 4, 64, 64),
                     (256, 1024, 4096), extra)
    if name == "quick":
        # budget: ~20 s of set-up (device peaks, one accuracy check per op) and ~3 s per op at
        # T=64 on a busy 2-core machine, so every op gets its smallest row (13 ops: 75 s)
        return Suite("quick", "cpu", "fp32", ("fwd", "fwd+bwd"), Config(1, 64, 2, 32, 32),
                     (64, 128), (), Config(B=1, T=40, H=1, K=16, V=24, ssd_chunk=16),
                     max_case_s=20.0, budget_s=75.0, min_time_s=0.02, max_time_s=0.1,
                     once_over_s=2.0, round_s=0.02)
    if name == "gpu":
        return Suite("gpu", "cuda", "bf16", MODES, Config(2, 2048, 16, 128, 128),
                     (2048, 4096, 8192, 16384), (),
                     max_case_s=20.0, budget_s=400.0, min_time_s=0.1, max_time_s=0.4,
                     round_s=0.05)
    raise ValueError(f"unknown suite {name!r}: cpu, quick or gpu")


def default_providers(device: torch.device) -> Tuple[str, ...]:
    """Every lightning_ops backend, SDPA and the peers, and on CPU the peers' pure-PyTorch
    references (on GPU only when asked for: there the peers' kernels are the comparison);
    unavailable ones drop out per op."""
    return OURS + PEERS + (PEER_REFS if device.type == "cpu" else ())


def plan(s: Suite, ops: Sequence[str], providers: Optional[Sequence[str]],
         modes: Sequence[str], Ts: Sequence[int], dtypes: Sequence[str],
         device: torch.device, extras: bool = True) -> Tuple[List[Case], List[str]]:
    """The cases to run, in priority order, so a run that hits its time budget still has every
    op at its smallest size and the suite's headline rows: the smallest T for every op (and the
    decode steps, at T = 1, once), then the headline ops (suite.extra) by growing T, then any
    reference rows, then everything else by growing T. An op's cases are only in its modes.
    Returns (cases, notes)."""
    notes, cases, seen = [], [], set()
    wanted = list(providers) if providers else list(default_providers(device))
    rows = [(op, p, T, ()) for T in Ts for op in ops for p in wanted]
    if extras:
        rows += [(op, p, T, ms) for op, p, T, ms in s.extra
                 if op in ops and (providers is None or p in providers)]
    reported = set()
    for op_name, p, T, only in rows:
        op = OPS[op_name]
        why = provider_missing(p, op, device)
        if why is not None:
            # say it once per (op, provider), and only when someone would expect the pair
            # (ours-triton / ours-cuda are absent for most families on most devices: only
            # said when asked for; a missing op or peer is always said)
            if (op_name, p) not in reported and (providers or p == "ours-torch"
                                                 or p in op.peers or p in op.peer_refs):
                notes.append(f"{op_name}: {p} skipped: {why}")
            reported.add((op_name, p))
            continue
        ref = op.peer_refs.get(p)
        if ref is not None and ref.max_T is not None and T > ref.max_T and not op.decode:
            if (op_name, p, "max_T") not in reported:
                notes.append(f"{op_name}: {p} skipped: above T={ref.max_T} (its T x T tensors)")
            reported.add((op_name, p, "max_T"))
            continue
        for dt in dtypes:
            for m in modes:
                if (only and m not in only) or m not in op.modes:
                    continue
                c = Case(op_name, p, s.base.with_T(1 if op.decode else T), m, dt)
                if c not in seen:
                    seen.add(c)
                    cases.append(c)
    order = {n: i for i, n in enumerate(OPS)}
    first_T = min((c.cfg.T for c in cases if not OPS[c.op].decode), default=0)
    targets = {x[0] for x in s.extra} if extras else set()

    def priority(c: Case) -> int:
        if (c.cfg.T == first_T or OPS[c.op].decode) and c.provider != "reference":
            return 0  # every op at the smallest size first (decode steps have one size)
        if c.op in targets:
            return 1  # then the suite's headline rows, growing T (for the runtime prediction)
        return 2 if c.provider == "reference" else 3

    cases.sort(key=lambda c: (priority(c), c.cfg.T, order[c.op], PROVIDERS.index(c.provider),
                              MODES.index(c.mode)))
    return cases, notes


def pytest_cases(quick: bool = True) -> List[Case]:
    """The registry as pytest-benchmark parameters (tiny shapes unless quick=False)."""
    s = suite("quick" if quick else "cpu")
    cases, _ = plan(s, list(OPS), None, ("fwd", "fwd+bwd"), s.Ts[:1], (s.dtype,),
                    torch.device("cpu"), extras=False)
    return cases


def asked_but_unavailable(ops: Sequence[str], providers: Optional[Sequence[str]],
                          device: torch.device) -> List[str]:
    """Errors for what the user asked for and cannot get: a provider (given explicitly) that can
    run none of the asked ops, or an op that none of the providers can run."""
    wanted = list(providers) if providers else list(default_providers(device))
    why = {(o, p): provider_missing(p, OPS[o], device) for o in ops for p in wanted}
    errors = []
    if providers:
        for p in providers:
            if all(why[(o, p)] is not None for o in ops):
                reasons = sorted({why[(o, p)] for o in ops})
                errors.append(f"provider {p} cannot run here: {'; '.join(reasons)}")
    for o in ops:
        if all(why[(o, p)] is not None for p in wanted) and not any(
                e.startswith(f"provider {p} ") for e in errors for p in wanted):
            errors.append(f"op {o}: none of the providers ({', '.join(wanted)}) can run it: "
                          + "; ".join(f"{p}: {why[(o, p)]}" for p in wanted))
    return errors
