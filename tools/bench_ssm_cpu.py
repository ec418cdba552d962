"""CPU side-by-side of the SSM family's torch path against the peers' pure-PyTorch references,
interleaved (A B A B ...) so machine load hits every provider alike.

  OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python tools/bench_ssm_cpu.py scan conv ssd step \
      [--rounds 7] [--threads 2] [--before-rev HEAD~1] [--quick] [--modes fwd,fwd+bwd]

Peers. mamba-ssm and causal-conv1d are not installed here (they need CUDA to build), so their
pure-PyTorch code is written out below from their published sources (mamba-ssm 2.x,
causal-conv1d 1.x): the same operations in the same order. When the packages are importable,
their own selective_state_update_ref / causal_conv1d_update_ref are used instead.
  scan  mamba-ssm's selective_scan_ref: deltaA = exp(delta A), deltaB_u = delta B u for the whole
        [b, d, L, n] tensor up front, then a Python loop h = deltaA_t h + deltaB_u_t, y_t = h C_t
  conv  causal-conv1d's reference: F.conv1d(x, w, b, padding=W-1, groups=D)[..., :L], then SiLU
  ssd   ssd_minimal_discrete (block 64): segment-sum decay masks, diagonal blocks by einsum,
        chunk states, inter-chunk recurrence by a decay matrix, off-diagonal outputs; the "Dz"
        rows add the Mamba2 layer's own lines y + D x, y * silu(z) (rmsnorm=False) around it,
        against our op with D and z (which then saves the pre-gate output for dz)
  step  decode steps, each sample 200 calls:
        ssu2   Mamba-2 shape (tied dt / A over p, as Mamba2.step passes them) against the torch
               lines of mamba-ssm's Mamba2.step (dA = exp(dt A), einsum dBx, state.copy_,
               einsum y, + D x) and against selective_state_update_ref
        ssu1   Mamba-1 shape (state [b, D, n]) against selective_state_update_ref and the torch
               lines of mamba-ssm's Mamba.step
        convu  causal_conv1d_update (x [b, D], state [b, D, W-1]) against causal-conv1d's
               causal_conv1d_update_ref, and Mamba.step's lines (state [b, D, W]: roll, write,
               sum(state * w), + bias, SiLU)
--before-rev REV also times lightning_ops/ssm/torch.py as it was at REV ("before"; ops.py is the
current one).
Reported: median ms per provider, and per-round ratios ours / peer (median [min, max]).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_ops as lo  # noqa: E402
from lightning_ops import backend as _backend  # noqa: E402


# ------------------------------------------------------------------------------------------------
# peers, written from their math
# ------------------------------------------------------------------------------------------------
def mamba_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False):
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    x = A.new_zeros((b, d, A.shape[1]))
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    ys = []
    for i in range(L):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out.to(dtype_in)


def _ssu_ref_local(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update_ref (einops spelled
    out as views / repeat_interleave)."""
    has_heads = state.dim() > 3
    if state.dim() == 3:
        state = state.unsqueeze(1)
    if x.dim() == 2:
        x = x.unsqueeze(1)
    if dt.dim() == 2:
        dt = dt.unsqueeze(1)
    if A.dim() == 2:
        A = A.unsqueeze(0)
    if B.dim() == 2:
        B = B.unsqueeze(1)
    if C.dim() == 2:
        C = C.unsqueeze(1)
    if D is not None and D.dim() == 1:
        D = D.unsqueeze(0)
    if z is not None and z.dim() == 2:
        z = z.unsqueeze(1)
    if dt_bias is not None and dt_bias.dim() == 1:
        dt_bias = dt_bias.unsqueeze(0)
    batch, nheads, dim, dstate = state.shape
    ngroups = B.shape[1]
    if dt_bias is not None:
        dt = dt + dt_bias
    dt = F.softplus(dt) if dt_softplus else dt
    dA = torch.exp(dt[..., None] * A)  # (batch, nheads, dim, dstate)
    B = B.repeat_interleave(nheads // ngroups, dim=1)  # (batch, nheads, dstate)
    C = C.repeat_interleave(nheads // ngroups, dim=1)
    dB = dt[..., None] * B[:, :, None, :]  # (batch, nheads, dim, dstate)
    state.copy_(state * dA + dB * x[..., None])
    out = torch.einsum("bhdn,bhn->bhd", state.to(C.dtype), C)
    if D is not None:
        out += (x * D).to(out.dtype)
    out = (out if z is None else out * F.silu(z)).to(x.dtype)
    if not has_heads:
        out = out.squeeze(1)
    return out


def _conv_update_ref_local(x, conv_state, weight, bias=None, activation=None):
    """causal_conv1d.causal_conv1d_interface.causal_conv1d_update_ref (no cache_seqlens)."""
    dtype_in = x.dtype
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    state_len = conv_state.shape[-1]
    x_new = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(x_new[:, :, -state_len:])
    out = F.conv1d(x_new, weight.unsqueeze(1), bias, padding=0, groups=dim)[:, :, -seqlen:]
    if unsqueeze:
        out = out.squeeze(-1)
    return (out if activation is None else F.silu(out)).to(dtype=dtype_in)


def _peer_refs():
    """(selective_state_update_ref, causal_conv1d_update_ref, where they came from)."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref
        src = "mamba_ssm"
    except Exception:  # not installed (or its import needs CUDA): the local copy
        selective_state_update_ref, src = _ssu_ref_local, "local copy"
    try:
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_update_ref
        src2 = "causal_conv1d"
    except Exception:
        causal_conv1d_update_ref, src2 = _conv_update_ref_local, "local copy"
    return selective_state_update_ref, causal_conv1d_update_ref, f"ssu_ref: {src}, " \
        f"conv_update_ref: {src2}"


SSU_REF, CONV_UPDATE_REF, PEER_SOURCES = _peer_refs()


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    L, W = x.shape[-1], weight.shape[1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=W - 1, groups=x.shape[1])[..., :L]
    return F.silu(out) if activation in ("silu", "swish") else out


def _segsum(a):
    """[..., T] -> [..., T, T]: sum_{j < s <= i} a_s below the diagonal, -inf above."""
    T = a.shape[-1]
    x = a[..., None].expand(*a.shape, T)
    x = x.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(-1), 0).cumsum(-2)
    return x.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))


def ssd_minimal_discrete(X, A, B, C, block_len):
    """X [b, l, h, p] (x * dt), A [b, l, h] (dt * A), B, C [b, l, h, n]; l % block_len == 0."""
    b, l, h, p = X.shape
    c = l // block_len
    X, B, C = (t.reshape(b, c, block_len, h, -1) for t in (X, B, C))
    A = A.reshape(b, c, block_len, h).permute(0, 3, 1, 2)  # [b, h, c, l]
    A_cs = A.cumsum(-1)
    Lmask = torch.exp(_segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmask, X)
    decay_states = torch.exp(A_cs[..., -1:] - A_cs)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], 1)
    decay_chunk = torch.exp(_segsum(F.pad(A_cs[..., -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cs))
    return (Y_diag + Y_off).reshape(b, l, h, p), final


# ------------------------------------------------------------------------------------------------
# "before": the torch backend as it was at a git revision
# ------------------------------------------------------------------------------------------------
def load_before(rev: str) -> str:
    src = subprocess.run(["git", "show", f"{rev}:lightning_ops/ssm/torch.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    # the chunk engine moved from lightning_ops/gla/torch.py to lightning_ops/chunk/torch.py
    src = src.replace("from ..gla import torch as _gla", "from ..chunk import torch as _gla")
    path = Path(f"/tmp/_ssm_torch_{rev.replace('/', '_').replace('~', '_')}.py")
    path.write_text(src)
    name = "lightning_ops.ssm._torch_before"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    if "need_pre" not in inspect.signature(mod.ssd_forward).parameters:  # the older contract
        fwd, bwd = mod.ssd_forward, mod.ssd_backward
        def ssd_forward(*a, need_pre=False, **k):  # a placeholder pre: its backward recomputes
            x, z = a[0], a[6]
            pre = None if not need_pre or z is None else \
                torch.empty(x.shape, dtype=torch.float64 if x.dtype == torch.float64
                            else torch.float32)
            return tuple(fwd(*a, **k)) + (pre,)
        mod.ssd_forward = ssd_forward
        mod.ssd_backward = lambda *a, pre=None, **k: bwd(*a, **k)
    su, cu = mod.state_update, mod.conv_update  # older: heads form / x [b, D, L] only

    def state_update(state, x, dt, A, B, C, D, z, dt_bias, softplus):
        if state.dim() == 4:
            return su(state, x, dt, A, B, C, D, z, dt_bias, softplus)
        one = [None if t is None else t.unsqueeze(i) for t, i in
               zip((state, x, dt, A, B, C, D, z, dt_bias), (1, 1, 1, 0, 1, 1, 0, 1, 0))]
        return su(*one, softplus).squeeze(1)

    def conv_update(x, conv_state, weight, bias, activation):
        if x.dim() == 3:
            return cu(x, conv_state, weight, bias, activation)
        return cu(x.unsqueeze(-1), conv_state, weight, bias, activation).squeeze(-1)
    mod.state_update, mod.conv_update = state_update, conv_update
    return name


def with_module(family: str, modname: str, fn):
    def run():
        key = (family, "torch")
        old = _backend._MODULES[key]
        _backend._MODULES[key] = modname
        try:
            return fn()
        finally:
            _backend._MODULES[key] = old
    return run


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def _leaf(t, grad):
    return t.detach().requires_grad_(grad)


def scan_case(b, d, L, n=16, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * 0.5 - 1.0
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # S4D-real init
    Bm, Cm = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D, z = torch.randn(d, generator=g), torch.randn(b, d, L, generator=g)
    db = torch.rand(d, generator=g) * 0.1
    ins = [_leaf(t, grad) for t in (u, delta, A, Bm, Cm, D, z, db)]
    dy = torch.randn(b, d, L, generator=g)

    def ours():
        y = lo.selective_scan_fn(*ins, delta_softplus=True)
        if grad:
            y.backward(dy)
        return y

    def peer():
        y = mamba_selective_scan_ref(*ins, delta_softplus=True)
        if grad:
            y.backward(dy)
        return y
    return ours, peer


def conv_case(b, d, L, W=4, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _leaf(torch.randn(b, d, L, generator=g), grad)
    w = _leaf(torch.randn(d, W, generator=g), grad)
    bias = _leaf(torch.randn(d, generator=g), grad)
    dy = torch.randn(b, d, L, generator=g)

    def ours():
        y = lo.causal_conv1d_fn(x, w, bias, activation="silu")
        if grad:
            y.backward(dy)
        return y

    def peer():
        y = causal_conv1d_ref(x, w, bias, activation="silu")
        if grad:
            y.backward(dy)
        return y
    return ours, peer


def ssd_case(b, L, h, p, n, grad=False, seed=0, block=64, Dz=False):
    """Dz: with D [h] and z (ours: the op's D and z; peer: the Mamba2 layer's lines)."""
    g = torch.Generator().manual_seed(seed)
    x = _leaf(torch.randn(b, L, h, p, generator=g), grad)
    dt = _leaf(F.softplus(torch.randn(b, L, h, generator=g) - 2), grad)
    A = _leaf(-torch.exp(torch.randn(h, generator=g) * 0.5), grad)
    Bm = _leaf(torch.randn(b, L, 1, n, generator=g), grad)
    Cm = _leaf(torch.randn(b, L, 1, n, generator=g), grad)
    D = _leaf(torch.randn(h, generator=g), grad) if Dz else None
    z = _leaf(torch.randn(b, L, h, p, generator=g), grad) if Dz else None
    dy = torch.randn(b, L, h, p, generator=g)

    def ours():
        y = lo.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, block, D=D, z=z)
        if grad:
            y.backward(dy)
        return y

    def peer():
        y, _ = ssd_minimal_discrete(x * dt[..., None], A * dt, Bm.expand(b, L, h, n),
                                    Cm.expand(b, L, h, n), block)
        if Dz:
            y = (y + x * D[:, None]) * F.silu(z)
        if grad:
            y.backward(dy)
        return y
    return ours, peer


def step_case(b, h=8, p=64, n=128, seed=0, grad=False):
    """One Mamba-2 decode step (tied A / dt over p, as Mamba2.step passes them); peer: the
    pure-torch lines of mamba-ssm's Mamba2.step."""
    g = torch.Generator().manual_seed(seed)
    state0 = torch.randn(b, h, p, n, generator=g)
    s1, s2 = state0.clone(), state0.clone()
    x = torch.randn(b, h, p, generator=g)
    dt = torch.randn(b, h, generator=g)
    A = -torch.exp(torch.randn(h, generator=g))
    Bm, Cm = torch.randn(b, 1, n, generator=g), torch.randn(b, 1, n, generator=g)
    D, dtb = torch.randn(h, generator=g), torch.rand(h, generator=g)

    def ours():
        return lo.selective_state_update(
            s1, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n), Bm, Cm,
            D=D[:, None].expand(h, p), dt_bias=dtb[:, None].expand(h, p), dt_softplus=True)

    def peer():
        dtp = F.softplus(dt + dtb)
        dA = torch.exp(dtp * A)
        dBx = torch.einsum("bh,bn,bhp->bhpn", dtp, Bm[:, 0], x)
        s2.copy_(s2 * dA[..., None, None] + dBx)
        y = torch.einsum("bhpn,bn->bhp", s2, Cm[:, 0])
        return y + D[:, None] * x

    s3 = state0.clone()

    def peer_ref():
        return SSU_REF(s3, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n),
                       Bm, Cm, D=D[:, None].expand(h, p), dt_bias=dtb[:, None].expand(h, p),
                       dt_softplus=True)
    return ours, peer, peer_ref


def step1_case(b, d=1536, n=16, seed=0):
    """One Mamba-1 decode step (state [b, D, n], A [D, n], z): ours, selective_state_update_ref,
    and the torch lines of mamba-ssm's Mamba.step (dt already through dt_proj)."""
    g = torch.Generator().manual_seed(seed)
    state0 = torch.randn(b, d, n, generator=g)
    s1, s2, s3 = state0.clone(), state0.clone(), state0.clone()
    x, dt, z = (torch.randn(b, d, generator=g) for _ in range(3))
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    Bm, Cm = torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)
    D, dtb = torch.randn(d, generator=g), torch.rand(d, generator=g)

    def ours():
        return lo.selective_state_update(s1, x, dt, A, Bm, Cm, D=D, z=z, dt_bias=dtb,
                                         dt_softplus=True)

    def peer_ref():
        return SSU_REF(s2, x, dt, A, Bm, Cm, D=D, z=z, dt_bias=dtb, dt_softplus=True)

    def peer_step():
        dtp = F.softplus(dt + dtb)
        dA = torch.exp(torch.einsum("bd,dn->bdn", dtp, A))
        dB = torch.einsum("bd,bn->bdn", dtp, Bm)
        s3.copy_(s3 * dA + x[..., None] * dB)
        y = torch.einsum("bdn,bn->bd", s3, Cm)
        y = y + D * x
        return y * F.silu(z)
    return ours, peer_ref, peer_step


def conv_update_case(b, d=1536, W=4, seed=0):
    """One causal_conv1d_update step (x [b, D], SiLU): ours and causal_conv1d_update_ref with a
    [b, D, W-1] state, and Mamba.step's torch lines with its [b, D, W] state."""
    g = torch.Generator().manual_seed(seed)
    st = torch.randn(b, d, W, generator=g)
    s1, s2, s3 = st[..., 1:].clone(), st[..., 1:].clone(), st.clone()
    x = torch.randn(b, d, generator=g)
    w, bias = torch.randn(d, W, generator=g), torch.randn(d, generator=g)

    def ours():
        return lo.causal_conv1d_update(x, s1, w, bias, "silu")

    def peer_ref():
        return CONV_UPDATE_REF(x, s2, w, bias, "silu")

    def peer_step():
        s3.copy_(torch.roll(s3, shifts=-1, dims=-1))
        s3[:, :, -1] = x
        y = torch.sum(s3 * w, dim=-1) + bias
        return F.silu(y)
    return ours, peer_ref, peer_step


def interleaved(providers, rounds, warmup=1):
    """providers: {name: fn}. Returns {name: [seconds per round]}, run A B A B ..."""
    names = list(providers)
    for _ in range(warmup):
        for nm in names:
            providers[nm]()
    times = {nm: [] for nm in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for nm in order:
            t0 = time.perf_counter()
            providers[nm]()
            times[nm].append(time.perf_counter() - t0)
    return times


def report(label, times, peers=("peer",)):
    """Median ms per provider; per-round ratios ours / each peer (and before / peer)."""
    parts = [f"{label:<44}"]
    for nm, ts in times.items():
        parts.append(f"{nm} {1e3 * statistics.median(ts):8.1f} ms")
    for peer in peers:
        for nm, ts in times.items():
            if nm in peers:
                continue
            ratios = sorted(a / b for a, b in zip(ts, times[peer]))
            parts.append(f"{nm}/{peer} {statistics.median(ratios):.2f} "
                         f"[{ratios[0]:.2f}, {ratios[-1]:.2f}]")
    print("  ".join(parts), flush=True)


def _calls(prov, n=200):
    """Each sample times n calls (a decode step is ~0.1 ms)."""
    return {k: (lambda f=f: [f() for _ in range(n)]) for k, f in prov.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", default=["scan", "conv", "ssd"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before-rev", default=None)
    ap.add_argument("--quick", action="store_true", help="smaller shapes only")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"load={os.getloadavg()} torch={torch.__version__} rounds={args.rounds} "
          f"peers: {PEER_SOURCES}")
    before = load_before(args.before_rev) if args.before_rev else None
    modes = args.modes.split(",")
    for mode in modes:
        grad = mode == "fwd+bwd"
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            if "scan" in args.what:
                shapes = [(1, 256, 1024), (1, 256, 4096), (1, 1536, 1024), (2, 1536, 4096)]
                if args.quick:
                    shapes = shapes[:3]
                for b, d, L in shapes:
                    ours, peer = scan_case(b, d, L, grad=grad)
                    prov = {"ours": ours, "peer": peer}
                    if before:
                        prov["before"] = with_module("selective_scan", before, ours)
                    report(f"scan {mode} B={b} D={d} L={L} N=16", interleaved(prov, args.rounds))
            if "conv" in args.what:
                for b, d, L in [(1, 1536, 4096)] + ([] if args.quick else [(2, 1536, 4096)]):
                    ours, peer = conv_case(b, d, L, grad=grad)
                    prov = {"ours": ours, "peer": peer}
                    if before:
                        prov["before"] = with_module("conv", before, ours)
                    report(f"conv {mode} B={b} D={d} W=4 L={L} silu",
                           interleaved(prov, args.rounds))
            if "step" in args.what and not grad:
                for b in (1, 16):
                    ours, peer, peer_ref = step_case(b)
                    prov = {"ours": ours, "step": peer, "ref": peer_ref}
                    if before:
                        prov["before"] = with_module("ssd", before, ours)
                    report(f"ssu2 x200 B={b} h=8 p=64 n=128 (tied)",
                           interleaved(_calls(prov), args.rounds), peers=("step", "ref"))
                for b in (1, 16):
                    ours, peer_ref, peer_step = step1_case(b)
                    prov = {"ours": ours, "ref": peer_ref, "step": peer_step}
                    if before:
                        prov["before"] = with_module("ssd", before, ours)
                    report(f"ssu1 x200 B={b} D=1536 n=16 (z)",
                           interleaved(_calls(prov), args.rounds), peers=("ref", "step"))
                for b in (1, 16):
                    ours, peer_ref, peer_step = conv_update_case(b)
                    prov = {"ours": ours, "ref": peer_ref, "step": peer_step}
                    if before:
                        prov["before"] = with_module("conv", before, ours)
                    report(f"convu x200 B={b} D=1536 W=4 silu",
                           interleaved(_calls(prov), args.rounds), peers=("ref", "step"))
            if "ssd" in args.what:
                for b, L, h, p, n in [(1, 1024, 4, 64, 64), (1, 4096, 4, 64, 64)] + \
                        ([] if args.quick else [(2, 2048, 8, 64, 128)]):
                    for Dz in (False, True):
                        ours, peer = ssd_case(b, L, h, p, n, grad=grad, Dz=Dz)
                        prov = {"ours": ours, "peer": peer}
                        if before:
                            prov["before"] = with_module("ssd", before, ours)
                        report(f"ssd {mode} B={b} L={L} h={h} p={p} n={n}{' Dz' if Dz else ''}",
                               interleaved(prov, args.rounds))


if __name__ == "__main__":
    main()
