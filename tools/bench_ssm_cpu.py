"""CPU side-by-side of the SSM family's torch path against the peers' pure-PyTorch references,
interleaved (A B A B ...) so machine load hits every provider alike.

  OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python tools/bench_ssm_cpu.py scan conv ssd \
      [--rounds 7] [--threads 2] [--before-rev HEAD~1] [--quick]

Peers (local copies written from the published math, no install needed):
  scan  mamba-ssm's selective_scan_ref: deltaA = exp(delta A), deltaB_u = delta B u for the whole
        [b, d, L, n] tensor up front, then a Python loop h = deltaA_t h + deltaB_u_t, y_t = h C_t
  conv  causal-conv1d's reference: F.conv1d(x, w, b, padding=W-1, groups=D)[..., :L], then SiLU
  ssd   ssd_minimal_discrete (block 64): segment-sum decay masks, diagonal blocks by einsum,
        chunk states, inter-chunk recurrence by a decay matrix, off-diagonal outputs
--before-rev REV also times lightning_ops/ssm/torch.py as it was at REV ("before").
Reported: median ms per provider, and per-round ratios ours / peer (median [min, max]).
"""
from __future__ import annotations

import argparse
import importlib.util
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
    path = Path(f"/tmp/_ssm_torch_{rev.replace('/', '_').replace('~', '_')}.py")
    path.write_text(src)
    name = "lightning_ops.ssm._torch_before"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
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


def ssd_case(b, L, h, p, n, grad=False, seed=0, block=64):
    g = torch.Generator().manual_seed(seed)
    x = _leaf(torch.randn(b, L, h, p, generator=g), grad)
    dt = _leaf(F.softplus(torch.randn(b, L, h, generator=g) - 2), grad)
    A = _leaf(-torch.exp(torch.randn(h, generator=g) * 0.5), grad)
    Bm = _leaf(torch.randn(b, L, 1, n, generator=g), grad)
    Cm = _leaf(torch.randn(b, L, 1, n, generator=g), grad)
    dy = torch.randn(b, L, h, p, generator=g)

    def ours():
        y = lo.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, block)
        if grad:
            y.backward(dy)
        return y

    def peer():
        y, _ = ssd_minimal_discrete(x * dt[..., None], A * dt, Bm.expand(b, L, h, n),
                                    Cm.expand(b, L, h, n), block)
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
    return ours, peer


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


def report(label, times, peer="peer"):
    parts = [f"{label:<44}"]
    for nm, ts in times.items():
        parts.append(f"{nm} {1e3 * statistics.median(ts):8.1f} ms")
    for nm, ts in times.items():
        if nm == peer:
            continue
        ratios = sorted(a / b for a, b in zip(ts, times[peer]))
        parts.append(f"{nm}/{peer} {statistics.median(ratios):.2f} "
                     f"[{ratios[0]:.2f}, {ratios[-1]:.2f}]")
    print("  ".join(parts), flush=True)


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
          f"load={os.getloadavg()[0]:.1f} torch={torch.__version__} rounds={args.rounds}")
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
                    ours, peer = step_case(b)
                    prov = {"ours": ours, "peer": peer}
                    if before:
                        prov["before"] = with_module("ssd", before, ours)
                    # a call is ~100 us: each sample times 200 calls
                    batch = {k: (lambda f=f: [f() for _ in range(200)]) for k, f in prov.items()}
                    report(f"state_update x200 B={b} h=8 p=64 n=128", interleaved(batch,
                                                                                  args.rounds))
            if "ssd" in args.what:
                for b, L, h, p, n in [(1, 1024, 4, 64, 64), (1, 4096, 4, 64, 64)] + \
                        ([] if args.quick else [(2, 2048, 8, 64, 128)]):
                    ours, peer = ssd_case(b, L, h, p, n, grad=grad)
                    prov = {"ours": ours, "peer": peer}
                    if before:
                        prov["before"] = with_module("ssd", before, ours)
                    report(f"ssd {mode} B={b} L={L} h={h} p={p} n={n}",
                           interleaved(prov, args.rounds))


if __name__ == "__main__":
    main()
