"""Multi-process harness of the context-parallel tests: gloo ranks on CPU, spawned with a free
port and a deadline (a hang fails the test instead of blocking CI), and the parity cases.

Every rank builds the same full inputs from one seed, computes the single-process result of the
public op itself, then runs the CP wrapper on its slice; the losses are sum(o * do) + sum(ht *
dht), and the CP gradients of the full (sliced-from) inputs are summed over the ranks with an
all_reduce before the comparison, as are the final states (each rank holds the rows of the
sequences ending on it)."""
from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_ops as lo
import lightning_ops.cp as cp


# ------------------------------------------------------------------------------------------------
# spawning
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args, timeout: float = 150.0) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; re-raise the first failure; kill every
    rank and fail after `timeout` seconds."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"CP ranks still running after {timeout:.0f}s (a hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


# ------------------------------------------------------------------------------------------------
# cases: (inputs {name: (tensor, seq_dim | None)}, call(inputs, cu_seqlens, cp_context))
# ------------------------------------------------------------------------------------------------
def _qkv(B, T, H, K, V, dtype, HV=None):
    HV = HV or H
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    v = torch.randn(B, T, HV, V, dtype=dtype)
    return q, k, v


def make_case(family: str, B: int, T: int, N: int, dtype, H=2, K=8, V=6):
    """Full inputs (requires_grad leaves) and the call of one family's op."""
    q, k, v = _qkv(B, T, H, K, V, dtype)
    logsig = torch.nn.functional.logsigmoid
    h0 = torch.randn(N, H, K, V, dtype=torch.float64 if dtype == torch.float64 else
                     torch.float32)
    ins: Dict[str, Tuple[torch.Tensor, Optional[int]]] = {
        "q": (q, 1), "k": (k, 1), "v": (v, 1), "h0": (h0, None)}
    if family == "linear_attn":
        def call(x, cu, ctx, m=lo):
            return (m if ctx is None else cp).chunk_linear_attn(
                x["q"], x["k"], x["v"], initial_state=x["h0"], output_final_state=True,
                cu_seqlens=cu, **({} if ctx is None else {"cp_context": ctx}))
    elif family == "simple_gla":
        ins["g"] = (logsig(torch.randn(B, T, H, dtype=dtype)), 1)
        ins["g_gamma"] = (-torch.rand(H, dtype=dtype) * 0.3, None)

        def call(x, cu, ctx):
            return (lo if ctx is None else cp).chunk_simple_gla(
                x["q"], x["k"], x["v"], g=x["g"], g_gamma=x["g_gamma"], initial_state=x["h0"],
                output_final_state=True, cu_seqlens=cu,
                **({} if ctx is None else {"cp_context": ctx}))
    elif family == "gla":
        ins["g"] = (logsig(torch.randn(B, T, H, K, dtype=dtype)) * 0.5, 1)

        def call(x, cu, ctx):
            return (lo if ctx is None else cp).chunk_gla(
                x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"], output_final_state=True,
                cu_seqlens=cu, **({} if ctx is None else {"cp_context": ctx}))
    elif family in ("delta", "gated_delta", "kda"):
        ins["beta"] = (torch.rand(B, T, H, dtype=dtype), 1)
        if family == "gated_delta":
            ins["g"] = (logsig(torch.randn(B, T, H, dtype=dtype)), 1)
        if family == "kda":
            ins["g"] = (logsig(torch.randn(B, T, H, K, dtype=dtype)) * 0.5, 1)

        def call(x, cu, ctx):
            m = lo if ctx is None else cp
            kw = {"initial_state": x["h0"], "output_final_state": True, "cu_seqlens": cu}
            if ctx is not None:
                kw["cp_context"] = ctx
            if family == "delta":
                return m.chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)
            if family == "gated_delta":
                return m.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                use_qk_l2norm_in_kernel=True, **kw)
            return m.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
    elif family == "ssd":
        h, p, n, g = 4, 6, 8, 2
        ins = {
            "x": (torch.randn(B, T, h, p, dtype=dtype), 1),
            "dt": (torch.randn(B, T, h, dtype=dtype) * 0.5, 1),
            "A": (-torch.rand(h, dtype=dtype) - 0.2, None),
            "B": (torch.randn(B, T, g, n, dtype=dtype), 1),
            "C": (torch.randn(B, T, g, n, dtype=dtype), 1),
            "D": (torch.randn(h, dtype=dtype), None),
            "z": (torch.randn(B, T, h, p, dtype=dtype), 1),
            "dt_bias": (torch.randn(h, dtype=dtype) * 0.1, None),
            "h0": (torch.randn(N, h, p, n, dtype=h0.dtype), None),
        }

        def call(x, cu, ctx):
            m = lo if ctx is None else cp
            return m.mamba_chunk_scan_combined(
                x["x"], x["dt"], x["A"], x["B"], x["C"], 16, D=x["D"], z=x["z"],
                dt_bias=x["dt_bias"], initial_states=x["h0"], cu_seqlens=cu, dt_softplus=True,
                dt_limit=(0.01, 5.0), return_final_states=True,
                **({} if ctx is None else {"cp_context": ctx}))
    elif family == "conv":
        D, W = 5, 4
        ins = {"x": (torch.randn(B, D, T, dtype=dtype), 2),
               "w": (torch.randn(D, W, dtype=dtype), None),
               "b": (torch.randn(D, dtype=dtype), None),
               "h0": (torch.randn(N, D, W - 1, dtype=dtype), None)}

        def call(x, cu, ctx):
            if ctx is not None:
                return cp.causal_conv1d_fn(x["x"], x["w"], x["b"], initial_states=x["h0"],
                                           return_final_states=True, activation="silu",
                                           cp_context=ctx)
            return conv_reference(x["x"], x["w"], x["b"], x["h0"], cu)
    else:
        raise ValueError(family)
    for t, _ in ins.values():
        t.requires_grad_(True)
    return ins, call


def conv_reference(x, w, b, h0, cu):
    """Single process: the public causal_conv1d_fn, per sequence for packed batches (its
    initial_states are per batch row)."""
    if cu is None:
        return lo.causal_conv1d_fn(x, w, b, initial_states=h0, return_final_states=True,
                                   activation="silu")
    outs, fins = [], []
    c = cu.tolist()
    for n in range(len(c) - 1):
        xs = x[..., c[n]:c[n + 1]]
        if xs.shape[-1] == 0:  # (the public op rejects L=0 with initial_states)
            outs.append(xs)
            fins.append(h0[n:n + 1])
            continue
        o, f = lo.causal_conv1d_fn(xs, w, b, initial_states=h0[n:n + 1],
                                   return_final_states=True, activation="silu")
        outs.append(o)
        fins.append(f)
    return torch.cat(outs, dim=-1), torch.cat(fins)


FAMILIES = ["linear_attn", "simple_gla", "gla", "delta", "gated_delta", "kda", "ssd", "conv"]


def check_parity(rank: int, world: int, family: str, B: int, T: int,
                 cu_list: Optional[List[int]], dtype, tol: float,
                 bounds: Optional[List[int]] = None, seed: int = 0) -> None:
    torch.manual_seed(seed)
    cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32)
    N = B if cu is None else len(cu_list) - 1
    ins, call = make_case(family, B, T, N, dtype)
    o_ref, ht_ref = call({k_: t for k_, (t, _) in ins.items()}, cu, None)
    torch.manual_seed(seed + 1)
    do = torch.randn_like(o_ref)
    dht = torch.randn_like(ht_ref)
    leaves = [t for t, _ in ins.values()]
    g_ref = torch.autograd.grad((o_ref * do).sum() + (ht_ref * dht).sum(), leaves,
                                allow_unused=True)

    ctx = cp.build_cp_context(cu, bounds=bounds)
    if bounds is None:
        bounds = [r * T // world for r in range(world + 1)]
    s, e = bounds[rank], bounds[rank + 1]
    local = {k_: (t if d is None else t.narrow(d, s, e - s)) for k_, (t, d) in ins.items()}
    o, ht = call(local, None, ctx)
    sd = 2 if family == "conv" else 1
    loss = (o * do.narrow(sd, s, e - s)).sum() + (ht * dht).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    where = f"{family} world={world} rank={rank} B={B} cu={cu_list} bounds={bounds}"
    # every collective first (a failed comparison must not leave the other ranks waiting)
    ht = ht.detach().clone()
    dist.all_reduce(ht)
    summed = sum_over_ranks(grads, g_ref)
    _close(f"o [{where}]", o, o_ref.narrow(sd, s, e - s), tol)
    _close(f"final state [{where}]", ht, ht_ref, tol)
    for name, g_cp, g_1 in zip(ins, summed, g_ref):
        _close(f"d{name} [{where}]", g_cp, g_1, tol)


def _close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite"
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def sum_over_ranks(grads, like, group=None):
    """Each rank's gradient (zeros where it got none) all-reduced: the CP op's gradient of the
    whole input, to compare with the single-process one (like: those reference gradients)."""
    out = []
    for g_cp, g_1 in zip(grads, like):
        g_cp = torch.zeros_like(g_1) if g_cp is None else g_cp.detach().clone()
        dist.all_reduce(g_cp, group=group)
        out.append(g_cp)
    return out


def worker_all(rank: int, world: int, cases: list) -> None:
    """Run every (family, B, T, cu, dtype, tol, bounds) case; collect failures, fail at the end."""
    failures = []
    for case in cases:
        try:
            check_parity(rank, world, *case)
        except AssertionError as exc:
            failures.append(str(exc))
        except Exception:  # noqa: BLE001
            failures.append(f"{case[0]}: {traceback.format_exc()}")
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} failing:\n" + "\n".join(failures))


def check_comm_volume(rank: int, world: int) -> None:
    """Bytes per rank of one CP op call: fixed by (B, H, K, V), not by T; as stated in the
    README: forward all-gather (world-1) * n_cross * (H K V + H K) * 4 bytes received for GLA."""
    B, H, K, V = 2, 2, 8, 6
    seen = []
    for T_local in (4, 32):
        torch.manual_seed(0)
        q, k, v = _qkv(B, T_local, H, K, V, torch.float32)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T_local, H, K))
        for t in (q, k, v, g):
            t.requires_grad_(True)
        ctx = cp.build_cp_context(None)
        o, _ = cp.chunk_gla(q, k, v, g, cp_context=ctx)
        fwd = ctx.bytes_received
        o.sum().backward()
        seen.append((fwd, ctx.bytes_received - fwd, ctx.collectives))
    per_summary = B * (H * K * V + H * K) * 4
    assert seen[0] == seen[1], f"communication grows with T: {seen}"
    assert seen[0][0] == (world - 1) * per_summary, (seen, per_summary)
    assert seen[0][2] == 2, f"expected one collective forward and one backward, got {seen}"


def worker_suite(rank: int, world: int, cases: list, extras: tuple = ()) -> None:
    failures = []
    for name in extras:
        try:
            globals()[name](rank, world)
        except Exception:  # noqa: BLE001
            failures.append(f"{name}: {traceback.format_exc()}")
    try:
        worker_all(rank, world, cases)
    except AssertionError as exc:
        failures.append(str(exc))
    if failures:
        raise AssertionError("\n".join(failures))


# ------------------------------------------------------------------------------------------------
# FSDP2 (fully_shard) + CP: a few training steps, loss equal to the single-process run
# ------------------------------------------------------------------------------------------------
class TinyGLA(torch.nn.Module):
    """A GLA mixer (q/k/v/gate projections, chunk_gla, output projection) + a short conv."""

    def __init__(self, d=8, H=2, K=4, V=4):
        super().__init__()
        self.H, self.K, self.V = H, K, V
        self.qkv = torch.nn.Linear(d, H * (2 * K + V))
        self.gate = torch.nn.Linear(d, H * K)
        self.conv_w = torch.nn.Parameter(torch.randn(d, 4) * 0.3)
        self.out = torch.nn.Linear(H * V, d)

    def forward(self, x, cp_context=None):  # x [1, T, d]
        B, T, _ = x.shape
        x = x + cp.causal_conv1d_fn(x.transpose(1, 2), self.conv_w, activation="silu",
                                    cp_context=cp_context).transpose(1, 2)
        H, K, V = self.H, self.K, self.V
        q, k, v = self.qkv(x).view(B, T, H, 2 * K + V).split([K, K, V], dim=-1)
        g = torch.nn.functional.logsigmoid(self.gate(x)).view(B, T, H, K)
        o, _ = cp.chunk_gla(q, k, v, g, cp_context=cp_context)
        return self.out(o.reshape(B, T, H * V)).clone()


def _train(model, x, y, cu, ctx, steps, world_loss, grad_scale=1.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x, cp_context=ctx)
        loss = ((out - y) ** 2).sum() / world_loss  # the mean over ALL tokens of all ranks
        (loss * grad_scale).backward()
        opt.step()
        total = loss.detach().clone()
        if ctx is not None:
            dist.all_reduce(total)
        losses.append(total.item())
    return losses


def check_fsdp2_training(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    T, d = 16, 8
    x, y = torch.randn(1, T, d), torch.randn(1, T, d)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)  # sequence 1 crosses the rank boundary
    ref = TinyGLA(d)
    model = TinyGLA(d)
    model.load_state_dict(ref.state_dict())
    # single process: the plain ops need cu_seqlens; run the same layer per sequence
    def ref_forward(inp, cp_context=None):
        return torch.cat([TinyGLA.forward(ref, inp[:, a:b]) for a, b in ((0, 5), (5, 16))], 1)
    ref.forward = ref_forward
    losses_ref = _train(ref, x, y, None, None, 3, T * d)

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    ctx = cp.build_cp_context(cu)
    s, e = ctx.bounds[rank], ctx.bounds[rank + 1]
    # CP: the ranks' losses add up, so must their gradients; FSDP2 averages them over the mesh
    # (set_gradient_divide_factor(1.0) would need PREMUL_SUM, which gloo lacks): scale by world
    losses = _train(model, x[:, s:e], y[:, s:e], cu, ctx, 3, T * d, grad_scale=world)
    for a, b in zip(losses, losses_ref):
        assert abs(a - b) <= 1e-5 * abs(b), f"FSDP2 + CP losses {losses} != single {losses_ref}"


# ------------------------------------------------------------------------------------------------
# layers (layers/*.py) with cp_context=: output and every parameter gradient equal the
# single-process layer
# ------------------------------------------------------------------------------------------------
def make_layer(kind: str, d: int = 16) -> torch.nn.Module:
    """A small float32 layer of each kind that takes cp_context (convs on where it has them)."""
    import layers as L
    if kind == "gla":
        return L.GatedLinearAttention(hidden_size=d, num_heads=2, use_short_conv=True,
                                      gate_low_rank_dim=4)
    if kind == "lightning":
        return L.LightningAttention(hidden_size=d, num_heads=2, layer_idx=1, num_layers=2)
    if kind == "delta":
        return L.DeltaNet(hidden_size=d, num_heads=2, use_gate=True)
    if kind == "gated_delta":
        return L.GatedDeltaNet(hidden_size=d, head_dim=8, num_heads=2, num_v_heads=4,
                               expand_v=1)
    if kind == "kda":
        return L.KimiDeltaAttention(hidden_size=d, head_dim=8, num_heads=2)
    if kind == "hgrn2":
        return L.HGRN2Attention(hidden_size=d, expand_ratio=8, use_short_conv=True)
    if kind == "hedgehog":
        return L.HedgehogAttention(hidden_size=d, num_heads=2)
    if kind == "mamba2":
        return L.Mamba2(d_model=d, d_state=8, headdim=8, chunk_size=8, dt_limit=(0.001, 2.0))
    if kind == "mamba2_mlp":  # the gated MLP channels, D per channel, y * silu(z) in the op
        return L.Mamba2(d_model=d, d_state=4, headdim=8, chunk_size=8, d_ssm=16,
                        D_has_hdim=True, rmsnorm=False)
    # log-linear: levels placed by absolute positions across the rank boundary; few levels
    # (keys over 2^(L-2) tokens back drop out) and small chunks so slots move, merge and fall off
    if kind == "log_linear_mamba2":
        return L.LogLinearMamba2(num_heads=4, head_dim=8, hidden_size=d, state_size=4,
                                 n_groups=2, chunk_size=4, num_levels=4, dt_limit=(0.001, 2.0))
    if kind == "log_linear_mamba2_gate":  # y * silu(z) in the op, D per channel, 15 levels
        return L.LogLinearMamba2(num_heads=2, head_dim=16, hidden_size=d, state_size=8,
                                 chunk_size=8, rmsnorm=False, D_has_hdim=True)
    if kind == "log_linear_gated_delta":
        return L.LogLinearGatedDeltaNet(hidden_size=d, head_dim=8, num_heads=2, num_v_heads=4,
                                        expand_v=1, num_levels=4)
    if kind == "log_linear_gated_delta_wide":  # default levels, K != V
        return L.LogLinearGatedDeltaNet(hidden_size=d, head_dim=8, num_heads=2, expand_v=0.75)
    raise ValueError(kind)


def _layer_out(layer, x, **kw) -> torch.Tensor:
    out = layer(x, **kw)
    return out if isinstance(out, torch.Tensor) else out[0]


def check_layer_parity(rank: int, world: int, kind: str, B: int, T: int,
                       cu_list: Optional[List[int]], tol: float, seed: int = 0) -> None:
    """The layer on this rank's slice with cp_context against the whole input in one process:
    the output slice, dL/dx and every parameter gradient (summed over the ranks)."""
    torch.manual_seed(seed)
    layer = make_layer(kind)
    cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32)
    x = torch.randn(B, T, layer.hidden_size, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    o_ref = _layer_out(layer, x, **({} if cu is None else {"cu_seqlens": cu}))
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad((o_ref * do).sum(), [x] + params)

    ctx = cp.build_cp_context(cu)
    s, e = (ctx.bounds[rank], ctx.bounds[rank + 1]) if cu is not None else \
        (rank * T // world, (rank + 1) * T // world)
    x_loc = x.detach()[:, s:e].clone().requires_grad_(True)
    o = _layer_out(layer, x_loc, cp_context=ctx)
    grads = torch.autograd.grad((o * do[:, s:e]).sum(), [x_loc] + params)
    dx = torch.zeros_like(x)
    dx[:, s:e] = grads[0]
    summed = []
    for g in [dx] + [t.detach().clone() for t in grads[1:]]:
        dist.all_reduce(g)
        summed.append(g)
    where = f"{kind} world={world} rank={rank} B={B} T={T} cu={cu_list}"
    _close(f"output [{where}]", o, o_ref[:, s:e], tol)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, g_cp, g_1 in zip(names, summed, g_ref):
        _close(f"d{name} [{where}]", g_cp, g_1, tol)


def check_compiled_cp(rank: int, world: int) -> None:
    """torch.compile(fullgraph=True) of a layer with cp_context: the collective (an all-gather
    forward, an all-reduce / reduce-scatter backward) is traced into the graph, and output and
    gradients equal the eager CP run. The backend: $LIGHTNING_OPS_CP_COMPILE_BACKEND, default
    aot_eager (dynamo + AOTAutograd and its partitioner, without inductor's minutes of C++
    compiling on a CI CPU; 'inductor' passes too)."""
    import torch._dynamo
    backend = os.environ.get("LIGHTNING_OPS_CP_COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    layer = make_layer("gla")
    cu = torch.tensor([0, 5, 17, 24], dtype=torch.int32)
    ctx = cp.build_cp_context(cu)
    s, e = ctx.bounds[rank], ctx.bounds[rank + 1]
    x = torch.randn(1, 24, layer.hidden_size)[:, s:e].contiguous()
    params = list(layer.parameters())

    def run(fn):
        xl = x.clone().requires_grad_(True)
        o = fn(xl, cp_context=ctx)[0]
        return [o] + list(torch.autograd.grad(o.square().sum(), [xl] + params))

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True, backend=backend))
    for i, (a, b) in enumerate(zip(compiled, eager)):
        _close(f"compiled vs eager CP, tensor {i} [rank {rank}]", a, b, 1e-6)


def check_hmamba_op(rank: int, world: int) -> None:
    """cp.hmamba_chunk_scan_combined (log-linear Mamba-2's scan) against the public op in
    float64 (1e-10): output slice, final (ht, offsets) and every gradient, including the
    initial hierarchy at user offsets, grouped B/C, D per channel, z, dt_bias / softplus /
    dt_limit; dense (B = 2) and varlen (a sequence crossing the boundary, an empty one)."""
    from lightning_ops.loglinear import LogLinearAttentionState, hmamba_chunk_scan_combined
    f64 = torch.float64
    for B, cu_list, D_hdim, lv in ((2, None, True, 5), (1, [0, 5, 17, 17, 24], False, 7)):
        torch.manual_seed(11)
        T, h, p, g, n = 24, 4, 3, 2, 4
        cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32)
        N = B if cu is None else len(cu_list) - 1
        ins = {"x": (torch.randn(B, T, h, p, dtype=f64), 1),
               "dt": (torch.randn(B, T, h, dtype=f64) * 0.5, 1),
               "A": (-torch.rand(h, dtype=f64) - 0.2, None),
               "B": (torch.randn(B, T, g, n, dtype=f64), 1),
               "C": (torch.randn(B, T, g, n, dtype=f64), 1),
               "dl": (torch.randn(B, T, h, lv, dtype=f64), 1),
               "L": (torch.rand(h, lv, dtype=f64) + 0.5, None),
               "D": (torch.randn(h * p if D_hdim else h, dtype=f64), None),
               "z": (torch.randn(B, T, h, p, dtype=f64), 1),
               "dt_bias": (torch.randn(h, dtype=f64) * 0.1, None),
               "h0": (torch.randn(N, h, lv, n, p, dtype=f64), None)}
        for t, _ in ins.values():
            t.requires_grad_(True)
        offsets = torch.randint(0, 40, (N,), dtype=torch.int64)

        def call(x, cu_, ctx):
            fn = hmamba_chunk_scan_combined if ctx is None else cp.hmamba_chunk_scan_combined
            D = x["D"].view(h, p) if D_hdim else x["D"]
            return fn(x["x"], x["dt"], x["A"], x["B"], x["C"], x["dl"], x["L"], 4, D=D,
                      z=x["z"], dt_bias=x["dt_bias"],
                      initial_states=LogLinearAttentionState(x["h0"], offsets), cu_seqlens=cu_,
                      dt_softplus=True, dt_limit=(0.01, 5.0), return_final_states=True,
                      **({} if ctx is None else {"cp_context": ctx}))

        full = {k_: t for k_, (t, _) in ins.items()}
        y_ref, st_ref = call(full, cu, None)
        dy, dht = torch.randn_like(y_ref), torch.randn_like(st_ref.ht)
        leaves = [t for t, _ in ins.values()]
        g_ref = torch.autograd.grad((y_ref * dy).sum() + (st_ref.ht * dht).sum(), leaves)
        ctx = cp.build_cp_context(cu)
        s, e = (ctx.bounds[rank], ctx.bounds[rank + 1]) if cu is not None else \
            (rank * T // world, (rank + 1) * T // world)
        local = {k_: (t if d is None else t.narrow(d, s, e - s)) for k_, (t, d) in ins.items()}
        y, st = call(local, None, ctx)
        grads = torch.autograd.grad((y * dy[:, s:e]).sum() + (st.ht * dht).sum(), leaves,
                                    allow_unused=True)
        ht, off = st.ht.detach().clone(), st.offsets.clone()
        dist.all_reduce(ht)
        dist.all_reduce(off)
        summed = sum_over_ranks(grads, g_ref)
        where = f"hmamba op world={world} rank={rank} B={B} cu={cu_list}"
        _close(f"y [{where}]", y, y_ref[:, s:e], 1e-10)
        _close(f"final ht [{where}]", ht, st_ref.ht, 1e-10)
        assert torch.equal(off, st_ref.offsets), f"final offsets [{where}]"
        for name, g_cp, g_1 in zip(ins, summed, g_ref):
            _close(f"d{name} [{where}]", g_cp, g_1, 1e-10)


def worker_layers(rank: int, world: int, cases: list, extras: tuple = ()) -> None:
    """Every (kind, B, T, cu, tol) layer case, then the extras; fail at the end with all."""
    failures = []
    for case in cases:
        try:
            check_layer_parity(rank, world, *case)
        except AssertionError as exc:
            failures.append(str(exc))
        except Exception:  # noqa: BLE001
            failures.append(f"{case[0]}: {traceback.format_exc()}")
    for name in extras:
        try:
            globals()[name](rank, world)
        except Exception:  # noqa: BLE001
            failures.append(f"{name}: {traceback.format_exc()}")
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} failing:\n" + "\n".join(failures))
