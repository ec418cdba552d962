"""Per-token cost of the torch backend against sequence length (issue 18, item 5): time per
token, minor page faults per token, system-time share and peak forward memory per token, each
with its ratio to the shortest length.

  OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_per_token.py \
      [--ops chunk_gla,chunk_simple_gla,chunk_gated_delta_rule] [--lengths 1024,4096,16384,32768] \
      [--threads 2] [--repeats 5] [--modes fwd,fwd+bwd] [--no-memory] [--sdpa]

Time. Every (op, mode, T) case is warmed up once, then the rounds run the cases interleaved
(round r: every case once, in a rotated order), so machine load hits all lengths alike. One
sample processes about max(lengths) tokens (max(lengths) // T calls in a row), so short and long
lengths are timed over the same amount of work. Per sample: wall time, ru_minflt and ru_stime
deltas of this process (getrusage(RUSAGE_SELF): all its threads). Reported: median us/token
over the rounds, its ratio to the first length's median ("x1K"), the per-round ratios' range,
minor faults per token and system time as a share of wall time x threads.

Memory. Peak forward memory per token: a fresh subprocess per (op, T) makes the inputs (no
grad), runs a short warm-up call (T=256, so one-time allocations are not counted), resets the
resident-set high-water mark (`echo 5 > /proc/self/clear_refs`), runs one forward at T and reads
VmHWM - VmRSS(before): the pages the forward touched on top of what it was given, the output
included (SDPA's output alone is H*V*4 = 1 KiB/token at H=4, V=64). Linux only (else '-').
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.registry import OPS, Config  # noqa: E402

DEFAULT_OPS = "chunk_gla,chunk_simple_gla,chunk_gated_delta_rule"
DEFAULT_LENGTHS = "1024,4096,16384,32768"


def _fn(op: str):
    if op == "sdpa":
        def sdpa(q, k, v):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            return o.transpose(1, 2)
        return sdpa
    import lightning_ops
    return getattr(lightning_ops, op)


def make_inputs(op: str, T: int, H: int, D: int, grad: bool, seed: int = 0):
    cfg = Config(B=1, T=T, H=H, K=D, V=D)
    spec = OPS["chunk_linear_attn" if op == "sdpa" else op]
    inputs = spec.make_inputs(cfg, torch.float32, "cpu", seed=seed, grad=grad)
    return inputs, spec.kwargs(spec.dims(cfg))


def _main_output(r):
    return r[0] if isinstance(r, (tuple, list)) else r


def build_call(op: str, T: int, H: int, D: int, mode: str):
    fn = _fn(op)
    inputs, kwargs = make_inputs(op, T, H, D, grad=mode != "fwd")
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(**inputs, **kwargs)
        return call
    leaves = [x for x in inputs.values() if x.requires_grad]
    do = torch.randn_like(inputs["v"])

    def call():
        o = _main_output(fn(**inputs, **kwargs))
        torch.autograd.grad(o, leaves, do, allow_unused=True)
    return call


def _sample(call, n: int):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        call()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return t1 - t0, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime


# ------------------------------------------------------------------------------------------------
# memory: one fresh process per (op, T)
# ------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child_memory(op: str, T: int, H: int, D: int) -> None:
    fn = _fn(op)
    with torch.no_grad():
        warm, kw = make_inputs(op, min(T, 256), H, D, grad=False)
        fn(**warm, **kw)
        del warm
        inputs, kwargs = make_inputs(op, T, H, D, grad=False, seed=1)
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn(**inputs, **kwargs)
        peak = _status_kb("VmHWM")
        del out
    print(json.dumps({"peak_kb": peak - before}))


def peak_forward_kib(op: str, T: int, H: int, D: int, threads: int):
    cmd = [sys.executable, __file__, "--child-memory", op, str(T), str(H), str(D),
           "--threads", str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, OSError) as e:
        print(f"  memory {op} T={T}: failed ({e})", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=DEFAULT_OPS, help="comma-separated public op names")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated T, first = base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="K = V")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-time", action="store_true", help="only the peak-memory column")
    p.add_argument("--sdpa", action="store_true", help="add causal SDPA rows (as a yardstick)")
    p.add_argument("--child-memory", nargs=4, metavar=("OP", "T", "H", "D"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.child_memory:
        op, T, H, D = a.child_memory
        _child_memory(op, int(T), int(H), int(D))
        return

    ops = [o for o in a.ops.split(",") if o] + (["sdpa"] if a.sdpa else [])
    lengths = [int(t) for t in a.lengths.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    H, D = a.heads, a.dim
    per_sample = max(lengths)
    print(f"# torch {torch.__version__}, threads {a.threads}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, fp32 B=1 H={H} K=V={D}, {a.repeats} rounds; "
          f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    rows = {}
    if not a.no_time:
        cases = [(op, mode, T) for op in ops for mode in modes for T in lengths]
        calls = {}
        for c in cases:  # build + warm up (the first call pays one-time costs)
            calls[c] = build_call(c[0], c[2], H, D, c[1])
            calls[c]()
        samples = {c: [] for c in cases}
        for r in range(a.repeats):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for c in order:
                n = max(1, per_sample // c[2])
                samples[c].append((n,) + _sample(calls[c], n))
        for c in cases:
            rows[c] = samples[c]
        del calls

    mem = {}
    if not a.no_memory:
        for op in ops:
            for T in lengths:
                mem[(op, T)] = peak_forward_kib(op, T, H, D, a.threads)

    base = lengths[0]
    print(f"\n| op | mode | T | us/token | x{base} [min, max] | minflt/token | sys % | "
          f"fwd peak KiB/token | x{base} |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for op in ops:
        for mode in modes:
            for T in lengths:
                cells = ["-"] * 5
                if rows:
                    s = rows[(op, mode, T)]
                    us = [t / (n * T) * 1e6 for n, t, _, _ in s]
                    b = [t / (n * base) * 1e6 for n, t, _, _ in rows[(op, mode, base)]]
                    ratios = [x / y for x, y in zip(us, b)]
                    flt = sum(f for _, _, f, _ in s) / sum(n * T for n, _, _, _ in s)
                    sys_share = sum(st for _, _, _, st in s) / sum(t for _, t, _, _ in s) \
                        / a.threads * 100
                    cells[:4] = [f"{statistics.median(us):.2f}",
                                 f"{statistics.median(us) / statistics.median(b):.2f} "
                                 f"[{min(ratios):.2f}, {max(ratios):.2f}]",
                                 f"{flt:.2f}", f"{sys_share:.0f}"]
                m, mb = mem.get((op, T)), mem.get((op, base))
                if mode == modes[0] and m is not None:
                    cells[4] = f"{m / T:.1f} | " + (f"{(m / T) / (mb / base):.2f}"
                                                    if mb else "-")
                else:
                    cells[4] = "- | -"
                print(f"| {op} | {mode} | {T} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n# load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
