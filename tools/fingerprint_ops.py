"""Bit-for-bit fingerprint of every public op: outputs, final states and all input gradients on a
fixed seed, per backend and dtype. Used to show that a restructuring changed no number:

    python tools/fingerprint_ops.py save /tmp/before.pt           # at the old commit
    python tools/fingerprint_ops.py compare /tmp/before.pt        # at the new one: exit 1 on any bit

`--backend triton` needs TRITON_INTERPRET=1 on a CPU machine (the interpreter is deterministic).
Odd shapes, a varlen batch, initial states and every gate kind; float64 and float32.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lightning_ops as lo  # noqa: E402


def _cases(dtype):
    g = torch.Generator().manual_seed(1234)

    def r(*shape, neg=False, pos=False):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if neg:
            x = -x.abs() * 0.3
        if pos:
            x = torch.rand(*shape, generator=g, dtype=torch.float64)
        return x.to(dtype)

    B, T, H, K, V = 2, 37, 2, 16, 24
    cu = torch.tensor([0, 5, 40, 74], dtype=torch.int32)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    qv, kv, vv = r(1, 74, H, K), r(1, 74, H, K), r(1, 74, H, V)
    h0, h0v = r(B, H, K, V), r(3, H, K, V)
    gs, gv = r(B, T, H, neg=True), r(B, T, H, K, neg=True)
    gsv, gvv = r(1, 74, H, neg=True), r(1, 74, H, K, neg=True)
    beta, betav = r(B, T, H, pos=True), r(1, 74, H, pos=True)
    gamma = -torch.tensor([0.1, 0.7], dtype=dtype)
    st = dict(initial_state=h0, output_final_state=True)
    stv = dict(initial_state=h0v, output_final_state=True, cu_seqlens=cu)
    cases = {}
    for mode, pre in (("chunk", "chunk_"), ("recurrent", "fused_recurrent_")):
        cases[pre + "linear_attn"] = (getattr(lo, pre + "linear_attn"), (q, k, v), st)
        cases[pre + "simple_gla"] = (getattr(lo, pre + "simple_gla"), (q, k, v),
                                     dict(g=gs, g_gamma=gamma, **st))
        cases[pre + "simple_gla_varlen"] = (getattr(lo, pre + "simple_gla"), (qv, kv, vv),
                                            dict(g=gsv, **stv))
        cases[pre + "gla"] = (getattr(lo, pre + "gla"), (q, k, v, gv), st)
        cases[pre + "gla_varlen"] = (getattr(lo, pre + "gla"), (qv, kv, vv, gvv), stv)
        cases[pre + "delta_rule"] = (getattr(lo, pre + "delta_rule"), (q, k, v, beta),
                                     dict(use_qk_l2norm_in_kernel=True, **st))
        cases[pre + "gated_delta_rule"] = (getattr(lo, pre + "gated_delta_rule"),
                                           (q, k, v, gs, beta), st)
        cases[pre + "gated_delta_rule_varlen"] = (getattr(lo, pre + "gated_delta_rule"),
                                                  (qv, kv, vv, gsv, betav), stv)
        cases[pre + "kda"] = (getattr(lo, pre + "kda"), (q, k, v, gv, beta), st)
    cases["lightning_attn"] = (lo.lightning_attn, (q, k, v, -gamma), st)
    cases["lion_attn"] = (lo.lion_attn, (q, k, v), dict(g=gs))
    cases["lion_attn_varlen"] = (lo.lion_attn, (qv, kv, vv), dict(g_gamma=gamma, cu_seqlens=cu))
    lam = r(B, T, H, 8, pos=True)
    cases["chunk_log_linear_attn"] = (lo.chunk_log_linear_attn, (q, k, v, gs, lam),
                                      dict(output_final_state=True))
    b, d, L, n = 2, 6, 29, 3
    cases["selective_scan_fn"] = (lo.selective_scan_fn,
                                  (r(b, d, L), r(b, d, L, pos=True), r(d, n, neg=True),
                                   r(b, n, L), r(b, n, L)),
                                  dict(D=r(d), z=r(b, d, L), delta_bias=r(d), delta_softplus=True,
                                       return_last_state=True))
    l, h, p, ng, sn = 45, 4, 8, 2, 5
    cases["mamba_chunk_scan_combined"] = (
        lo.mamba_chunk_scan_combined,
        (r(b, l, h, p), r(b, l, h, pos=True), r(h, neg=True), r(b, l, ng, sn), r(b, l, ng, sn), 16),
        dict(D=r(h), z=r(b, l, h, p), dt_bias=r(h), dt_softplus=True,
             initial_states=r(b, h, p, sn), return_final_states=True))
    cases["causal_conv1d_fn"] = (lo.causal_conv1d_fn, (r(b, d, L), r(d, 4)),
                                 dict(bias=r(d), initial_states=r(b, d, 3),
                                      return_final_states=True, activation="silu"))
    cases["selective_state_update"] = (
        lo.selective_state_update,
        (r(b, h, p, sn), r(b, h, p), r(b, h, p, pos=True), r(h, p, sn, neg=True),
         r(b, ng, sn), r(b, ng, sn)), dict(D=r(h, p), dt_softplus=True))
    cases["causal_conv1d_update"] = (lo.causal_conv1d_update, (r(b, d), r(b, d, 3), r(d, 4)),
                                     dict(activation="silu"))
    return cases


def _flat(res):
    out = []
    for t in res if isinstance(res, (tuple, list)) else (res,):
        if isinstance(t, torch.Tensor):
            out.append(t)
        elif isinstance(t, (tuple, list)):
            out.extend(_flat(t))
    return out


def fingerprint(backend: str, dtypes) -> dict:
    result = {}
    with lo.use_backend(backend):
        for dtype in dtypes:
            for name, (fn, args, kwargs) in _cases(dtype).items():
                leaves = []

                decode = name.endswith("_update")  # decode steps have no autograd

                def leaf(t):
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t = t.detach().clone().requires_grad_(not decode)
                        leaves.append(t)
                    return t
                a = [leaf(x) for x in args]
                kw = {n: leaf(x) for n, x in kwargs.items()}
                key = f"{backend}/{str(dtype)[6:]}/{name}"
                try:
                    outs = _flat(fn(*a, **kw))
                    outs = [o for o in outs if o.is_floating_point()]
                    gen = torch.Generator().manual_seed(7)
                    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
                               for o in outs if o.requires_grad)
                    grads = ([] if decode else
                             torch.autograd.grad(loss, leaves, allow_unused=True))
                    result[key] = [o.detach().clone() for o in outs] + \
                        [None if x is None else x.clone() for x in grads]
                except Exception as e:  # recorded: the same error must come back
                    result[key] = f"error: {type(e).__name__}: {e}"
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("save", "compare"))
    ap.add_argument("path")
    ap.add_argument("--backend", default="torch")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dtypes = (torch.float64, torch.float32)
    now = fingerprint(a.backend, dtypes)
    if a.action == "save":
        torch.save(now, a.path)
        print(f"saved {len(now)} cases to {a.path}")
        return 0
    old = torch.load(a.path)
    bad = []
    for key in sorted(set(old) | set(now)):
        x, y = old.get(key), now.get(key)
        if isinstance(x, str) or isinstance(y, str) or x is None or y is None:
            if x != y:
                bad.append(f"{key}: {x!r:.80} -> {y!r:.80}")
            continue
        if len(x) != len(y) or any((s is None) != (t is None) or (
                s is not None and not (s.shape == t.shape and s.dtype == t.dtype and
                                       torch.equal(s.view(-1).view(torch.uint8) if s.numel() else s,
                                                   t.view(-1).view(torch.uint8) if t.numel() else t)))
                for s, t in zip(x, y)):
            bad.append(f"{key}: values differ")
    print(f"{len(now)} cases compared, {len(bad)} differ")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
