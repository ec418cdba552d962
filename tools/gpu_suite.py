"""The GPU benchmark suite of the lease (tools/gpu_lane.py runs it): production shapes, ours side
by side with fla, mamba-ssm and SDPA/FlashAttention where importable, % of the HBM floor, decode-
step latency, and a bf16 parity check of each op against the float64 reference.

Shapes (B * T = 64K tokens at T = 2K, 8K, 32K; bf16; fwd and fwd+bwd):
  chunk_gated_delta_rule  Qwen3-Next: 16 q/k heads, 32 value heads, K = V = 128 (the registry's
                          ungrouped op at H = 32: q/k repeated to the value heads, for every
                          provider alike)
  chunk_kda                     Kimi Linear's head dims: H = 16, K = V = 128 (per-channel gates)
  chunk_gla, chunk_simple_gla   H = 16, K = V = 128
  chunk_log_linear_attn         log-linear Mamba-2: 32 value heads of 64, one q/k group of 128
  chunk_log_linear_gated_delta_rule   the same heads, forward only (its backward is the torch
                                recompute, not a kernel)
  mamba_chunk_scan_combined     Nemotron-H: head dim 64, state 128, 128 heads, chunk 256
  selective_scan_fn             Mamba-1: D = 1536 and 5120, N = 16
Decode (one token, state in, state out) at batch 1, 32, 256: fused_recurrent_gated_delta_rule
(Qwen3-Next heads), fused_recurrent_simple_gla and fused_recurrent_gla (H = 16, K = V = 128),
selective_state_update (Nemotron-H heads).

Inputs, cost model (bytes = inputs read once + outputs written once) and providers come from the
benchmarks package (registry, roofline); this file only chooses what to run and packs results.
--dry-run: CPU, TRITON_INTERPRET=1 (set by the caller before import), tiny shapes, our Triton
backend through the interpreter and SDPA; proves the code path, measures nothing.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# ops whose backward is not a kernel of ours (the log-linear Gated DeltaNet's is the torch
# recompute through autograd): their fwd+bwd would spend lease time measuring PyTorch
FWD_ONLY = {"chunk_log_linear_gated_delta_rule"}
FIELDS = ["kind", "op", "provider", "shape", "B", "T", "mode", "dtype", "median_ms",
          "tokens_per_s", "tflops", "gbps", "pct_floor", "rel_err", "note"]
TOKENS = 64 * 1024


def _cfgs(dry: bool):
    """(op, registry Config list, label) of the throughput grid."""
    from benchmarks.registry import Config
    Ts = (32,) if dry else (2048, 8192, 32768)
    tok = 32 if dry else TOKENS
    H, K = (1, 16) if dry else (16, 128)

    def grid(h, k, v, **kw):
        return [Config(max(1, tok // T), T, h, k, v, **kw) for T in Ts]
    out = [
        ("chunk_gated_delta_rule", grid(2 * H, K, K)),
        ("chunk_kda", grid(H, K, K)),
        ("chunk_gla", grid(H, K, K)),
        ("chunk_simple_gla", grid(H, K, K)),
        # log-linear Mamba-2 (fla's LogLinearMamba2 defaults): one q/k group of state 128
        # shared by 32 value heads of head dim 64 (hidden 1024, expand 2)
        ("chunk_log_linear_attn", grid(1 if dry else 32, K, 16 if dry else 64)),
        # its Gated DeltaNet form on the same heads (forward only: see FWD_ONLY)
        ("chunk_log_linear_gated_delta_rule", grid(1 if dry else 32, K, 16 if dry else 64)),
        # SSD: registry dims p = min(V, 64), h = H * V / p, n = K
        ("mamba_chunk_scan_combined", grid(1 if dry else 128, 16 if dry else 128,
                                           16 if dry else 64, ssd_chunk=16 if dry else 256)),
        ("selective_scan_fn", grid(1 if dry else 24, 16, 8 if dry else 64)),     # D = 1536
    ]
    if not dry:
        out.append(("selective_scan_fn", grid(80, 16, 64)))                      # D = 5120
    return out


def _providers(op, device) -> List[str]:
    from benchmarks.registry import provider_missing
    names = ["ours-triton", "ours-cuda", "fla", "mamba-ssm", "sdpa"]
    out = []
    for p in names:
        if provider_missing(p, op, device) is None:
            out.append(p)
        elif p == "ours-triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET"):
            out.append(p)  # dry run: the interpreter
    return out


def _time(fn: Callable[[], None], device, budget_ms: float) -> float:
    """Median ms (CUDA: triton.testing.do_bench, L2 flushed; CPU dry run: one call)."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    import triton.testing as tt
    return float(tt.do_bench(fn, warmup=10, rep=budget_ms, return_mode="median"))


def _step(op_name, provider, cfg, mode, dtype, device):
    """A zero-argument callable running one call (inputs made once), and the spec."""
    from benchmarks.registry import OPS, main_output, provider_function, spec_for
    op = OPS[op_name]
    spec = spec_for(provider, op)
    run = provider_function(provider, op)
    d = spec.dims(cfg)
    kwargs = spec.kwargs(d)
    grad = mode != "fwd"
    inputs = spec.make_inputs(cfg, dtype, device, seed=0, grad=grad)
    leaves = [x for x in inputs.values() if x.requires_grad]
    do = torch.randn(spec.shape_of(spec.output, d), device=device).to(dtype) if grad else None

    def step():
        if grad:
            o = main_output(run(inputs, kwargs))
            torch.autograd.grad(o, leaves, do, allow_unused=True)
        else:
            with torch.no_grad():
                run(inputs, kwargs)
    return step, spec


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parity(op_name: str, device, dtype, dry: bool) -> Dict:
    """Our op in `dtype` against the float64 reference spec at a small shape of the op's
    production head dims: relative RMS error of the output (bound 2e-2 in 16-bit, 1e-4 fp32)."""
    from benchmarks.registry import OPS, Config, main_output, provider_function
    op = OPS[op_name]
    cfgs = dict(_cfgs(dry))
    c = cfgs[op_name][0]
    cfg = Config(1, 24 if dry else 256, c.H, c.K, c.V, ssd_chunk=c.ssd_chunk)
    d = op.dims(cfg)
    inp = op.make_inputs(cfg, dtype, device, seed=1)
    ours = main_output(provider_function("ours-triton", op)(inp, op.kwargs(d)))
    ref_in = {k: v.double() for k, v in inp.items()}
    ref = main_output(op.reference(ref_in, op.kwargs(d)))
    err = _rel_rms(ours, ref)
    bound = 1e-4 if dtype == torch.float32 else 2e-2
    ok = math.isfinite(err) and err <= bound
    return dict(kind="parity", op=op_name, provider="ours-triton", shape=op.shape_label(cfg),
                B=cfg.B, T=cfg.T, mode="fwd", dtype=str(dtype).replace("torch.", ""),
                rel_err=f"{err:.3g}", note=("ok" if ok else f"FAIL (bound {bound})"))


def _decode_cases(dry: bool):
    """(name, batch list, builder(batch, dtype, device) -> {provider: callable})."""
    import lightning_ops as lo
    bs = (1,) if dry else (1, 32, 256)
    H, K = (1, 16) if dry else (16, 128)

    def gdn(b, dt, dev):
        HV = 2 * H
        q, k = torch.randn(b, 1, H, K, device=dev, dtype=dt), torch.randn(b, 1, H, K, device=dev,
                                                                          dtype=dt)
        k = torch.nn.functional.normalize(k.float(), dim=-1).to(dt)
        v = torch.randn(b, 1, HV, K, device=dev, dtype=dt)
        g = torch.nn.functional.logsigmoid(torch.randn(b, 1, HV, device=dev)).to(dt)
        beta = torch.rand(b, 1, HV, device=dev).to(dt)
        h0 = torch.randn(b, HV, K, K, device=dev)
        out = {"ours": lambda: lo.fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True)}
        try:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as f
            out["fla"] = lambda: f(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        except Exception:  # noqa: BLE001 - optional peer
            pass
        return out

    def gla(kind):
        def build(b, dt, dev):
            q, k, v = (torch.randn(b, 1, H, K, device=dev, dtype=dt) for _ in range(3))
            shape = (b, 1, H, K) if kind == "gla" else (b, 1, H)
            g = torch.nn.functional.logsigmoid(torch.randn(shape, device=dev)).to(dt)
            h0 = torch.randn(b, H, K, K, device=dev)
            fn = lo.fused_recurrent_gla if kind == "gla" else lo.fused_recurrent_simple_gla
            out = {"ours": lambda: fn(q, k, v, g, initial_state=h0, output_final_state=True)}
            try:
                if kind == "gla":
                    from fla.ops.gla import fused_recurrent_gla as f
                    out["fla"] = lambda: f(q, k, v, gk=g, initial_state=h0,
                                           output_final_state=True)
                else:
                    from fla.ops.simple_gla import fused_recurrent_simple_gla as f
                    out["fla"] = lambda: f(q, k, v, g, initial_state=h0, output_final_state=True)
            except Exception:  # noqa: BLE001
                pass
            return out
        return build

    def ssu(b, dt, dev):
        h, p, n = (4, 16, 16) if dry else (128, 64, 128)
        state = torch.randn(b, h, p, n, device=dev, dtype=dt)
        x = torch.randn(b, h, p, device=dev, dtype=dt)
        dtt = torch.rand(b, h, device=dev, dtype=dt)[..., None].expand(b, h, p)
        A = -torch.rand(h, device=dev)[:, None, None].expand(h, p, n)
        Bm, Cm = (torch.randn(b, 8 if not dry else 1, n, device=dev, dtype=dt) for _ in range(2))
        D = torch.randn(h, device=dev)[:, None].expand(h, p)
        dtb = torch.randn(h, device=dev)[:, None].expand(h, p)
        out = {"ours": lambda: lo.selective_state_update(state, x, dtt, A, Bm, Cm, D=D,
                                                          dt_bias=dtb, dt_softplus=True)}
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update as f
            out["mamba-ssm"] = lambda: f(state, x, dtt, A, Bm, Cm, D=D, dt_bias=dtb,
                                         dt_softplus=True)
        except Exception:  # noqa: BLE001
            pass
        return out

    return [("fused_recurrent_gated_delta_rule", bs, gdn), ("fused_recurrent_gla", bs, gla("gla")),
            ("fused_recurrent_simple_gla", bs, gla("simple")), ("selective_state_update", bs, ssu)]


def run(out_csv: str, dry: bool, budget_s: float, log=print) -> int:
    """Run the suite; write out_csv; return the number of parity failures."""
    from benchmarks.registry import OPS
    from benchmarks.roofline import achieved, measure_peaks
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    t_end = time.time() + budget_s
    f_csv = open(out_csv, "w", newline="")
    writer = csv.DictWriter(f_csv, FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()

    class Rows(list):  # every row reaches the CSV at once: a killed run keeps what it measured
        def append(self, r):
            super().append(r)
            writer.writerow(r)
            f_csv.flush()
    rows: List[Dict] = Rows()
    failures = 0
    peaks = measure_peaks(device, dtype, quick=dry)
    log(f"peaks: {peaks.what}")
    rows.append(dict(kind="peak", op="copy/matmul", provider="device", note=peaks.what))

    # 1. parity (fast, first: a failure is what the lease must find)
    for op_name, _ in _cfgs(dry):
        if any(r["kind"] == "parity" and r["op"] == op_name for r in rows):
            continue
        try:
            r = parity(op_name, device, dtype, dry)
        except Exception as e:  # noqa: BLE001 - a crash is a parity failure, reported
            r = dict(kind="parity", op=op_name, provider="ours-triton",
                     note=f"FAIL {type(e).__name__}: {str(e)[:200]}")
            log(traceback.format_exc(limit=3))
        failures += r["note"] != "ok"
        rows.append(r)
        log(f"parity {op_name}: {r.get('rel_err', '')} {r['note']}")

    # 2. throughput grid, each T for every op before the next T (a cut budget loses long T)
    grid = _cfgs(dry)
    n_T = len(grid[0][1])
    for i_T in range(n_T):
        for op_name, cfgs in grid:
            cfg = cfgs[i_T]
            op = OPS[op_name]
            for mode in ("fwd",) if op_name in FWD_ONLY else ("fwd", "fwd+bwd"):
                for prov in _providers(op, device):
                    base = dict(kind="throughput", op=op_name, provider=prov,
                                shape=op.shape_label(cfg), B=cfg.B, T=cfg.T, mode=mode,
                                dtype=str(dtype).replace("torch.", ""))
                    if time.time() > t_end:
                        rows.append(dict(base, note="skipped: suite budget spent"))
                        continue
                    try:
                        step, spec = _step(op_name, prov, cfg, mode, dtype, device)
                        step()  # compile / autotune outside the timing
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        ms = _time(step, device, 100.0)
                        a = achieved(spec.flops(cfg, mode), spec.bytes(cfg, dtype, mode),
                                     ms / 1e3, peaks)
                        rows.append(dict(base, median_ms=f"{ms:.4g}",
                                         tokens_per_s=f"{cfg.B * cfg.T / (ms / 1e3):.4g}",
                                         tflops=f"{a['tflops']:.3g}", gbps=f"{a['gbps']:.4g}",
                                         pct_floor=f"{a['pct_floor']:.3g}"))
                        log(f"{op_name:28s} {prov:12s} T={cfg.T:6d} {mode:8s} {ms:9.3f} ms "
                            f"{a['pct_floor']:6.1f} % floor")
                    except Exception as e:  # noqa: BLE001 - recorded, the lane goes on
                        rows.append(dict(base, note=f"error {type(e).__name__}: {str(e)[:160]}"))
                        log(f"{op_name} {prov} T={cfg.T} {mode}: {type(e).__name__}: {e}")
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()

    # 3. decode-step latency
    for name, batches, build in _decode_cases(dry):
        for b in batches:
            if time.time() > t_end:
                rows.append(dict(kind="decode", op=name, B=b, note="skipped: suite budget spent"))
                continue
            try:
                fns = build(b, dtype, device)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(kind="decode", op=name, B=b, note=f"error {e}"[:200]))
                continue
            for prov, fn in fns.items():
                try:
                    with torch.no_grad():
                        fn()
                        ms = _time(fn, device, 50.0)
                    rows.append(dict(kind="decode", op=name, provider=prov, B=b, T=1,
                                     mode="fwd", dtype=str(dtype).replace("torch.", ""),
                                     median_ms=f"{ms:.4g}"))
                    log(f"decode {name:34s} {prov:10s} b={b:4d} {1e3 * ms:9.1f} us")
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(kind="decode", op=name, provider=prov, B=b,
                                     note=f"error {type(e).__name__}: {str(e)[:160]}"))
    f_csv.close()
    return failures


def plot(csv_path: str, png: str) -> Optional[str]:
    """One figure: median ms per op and T (fwd+bwd), one line per provider."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional on the device
        return None
    rows = [r for r in csv.DictReader(open(csv_path)) if r["kind"] == "throughput"
            and r["median_ms"]]
    ops = sorted({r["op"] for r in rows})
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), 2, figsize=(10, 3 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[i][j]
            for prov in sorted({r["provider"] for r in rows if r["op"] == op}):
                pts = sorted((int(r["T"]), float(r["median_ms"])) for r in rows
                             if r["op"] == op and r["provider"] == prov and r["mode"] == mode)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode}", fontsize=9)
            ax.set_xlabel("T (B*T fixed)")
            ax.set_ylabel("ms")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="GPU benchmark suite of the lease")
    p.add_argument("--out", required=True, help="CSV path")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget-s", type=float, default=240.0)
    a = p.parse_args(argv)
    fails = run(a.out, a.dry_run, a.budget_s)
    plot(a.out, os.path.splitext(a.out)[0] + ".png")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
