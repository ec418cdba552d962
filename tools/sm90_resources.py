"""Ahead-of-time sm_90 resource check of every Triton kernel, at the launch configurations the
launchers really choose (no GPU needed: Triton compiles for a target through ptxas).

Two steps, each in its own process (TRITON_INTERPRET must be unset in both, since the launchers
pick GPU tile configs only when not interpreting):

  record   run the backends' forward/backward launchers on tiny CPU tensors, with
           triton_utils.pretend_gpu() so device-dependent rules choose as on an H100, and a hook
           on JITFunction.run that records every launch (kernel, argument types, constexprs,
           num_warps, num_stages, grid) instead of launching it.
  compile  (any python with triton and torch importable; e.g. .venv-triton36 for triton 3.6)
           compile each distinct recorded launch for sm_90 through the kernel's own binder
           (JITFunction.warmup with a stub driver), read shared bytes, registers and spill bytes
           (ptxas -v), reuse rows of the committed table whose key matches (kernel source,
           arguments, options, triton version).

`python tools/sm90_resources.py check [--python PY ...]` does both and writes the table
benchmarks/results/sm90_resources.csv; it exits non-zero when a configuration needs more shared
memory than an sm_90 block may have (triton_utils.SM90_SHARED_LIMIT), or a grid passes the
y/z limit. Rules for launch configurations live in lightning_ops/triton_utils.py.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "benchmarks", "results", "sm90_resources.csv")
FIELDS = ["triton", "kernel", "config", "num_warps", "num_stages", "shared_bytes", "registers",
          "spill_store_bytes", "spill_load_bytes", "fits", "key"]
SHARED_LIMIT = 232448   # = lightning_ops.triton_utils.SM90_SHARED_LIMIT (kept importable w/o torch)
GRID_YZ_MAX = 65535


# =============================================================================================
# record
# =============================================================================================
def _describe(v, exact=False):
    """JSON description of a launch argument, as far as it decides the compiled code: tensors by
    dtype, ints by Triton's specialization class (1, multiple of 16, other; i32 or i64), floats
    by type only."""
    import torch
    import triton.language as tl
    if v is None or isinstance(v, (bool, str)) or (exact and isinstance(v, (int, float))):
        return v
    if isinstance(v, int):
        if v in (0, 1):
            return v
        big = not -2**31 <= v < 2**31
        return (2**32 if big else 16) if v % 16 == 0 else (2**32 + 1 if big else 17)
    if isinstance(v, float):
        return 0.5
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", "")}
    if isinstance(v, tl.dtype):
        return {"tl": v.name}
    if isinstance(v, torch.dtype):
        return {"tensor": str(v).replace("torch.", "")}
    raise TypeError(f"cannot describe launch argument {v!r}")


class Recorder:
    """Context manager: JITFunction launches are recorded, not run."""

    def __init__(self):
        self.launches: List[dict] = []

    def __enter__(self):
        from triton.runtime.jit import JITFunction
        self._orig = JITFunction.run
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            if callable(grid):
                raise TypeError("callable grids are not recorded")
            names = fn.arg_names
            const = {p.name for p in fn.params if p.is_constexpr}

            def d(name, v):
                return _describe(v, name in const or name in ("num_warps", "num_stages"))
            rec.launches.append({
                "kernel": f"{fn.fn.__module__}:{fn.fn.__name__}",
                "args": [[names[i], d(names[i], a)] for i, a in enumerate(args)],
                "kwargs": {k: d(k, v) for k, v in sorted(kwargs.items())},
                "grid": [int(g) for g in (tuple(grid) + (1, 1))[:3]],
            })
            return None

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._orig
        return False


# --- what to run: every family at the shapes and options the launch rules distinguish --------
DTYPES = ("float32", "float16", "bfloat16")
# (K, V): every supported head-dim block class; V = 512 is the largest supported value dim
DIMS = ((16, 16), (64, 64), (128, 128), (256, 256), (64, 512), (256, 512))
# gated linear attention also takes K up to 512 (validation.MAX_GLA_KEY_DIM)
GLA_DIMS = DIMS + ((512, 64), (512, 512))


def _gla_cases(quick: bool):
    gates = ("none", "scalar", "gamma", "scalar+gamma", "vector")
    for dtype in DTYPES:
        for K, V in GLA_DIMS:
            for gate in gates:
                for varlen in (False, True):
                    # varlen changes index loads only: both ways at bf16, off otherwise
                    if varlen and dtype != "bfloat16":
                        continue
                    yield dict(family="gla", dtype=dtype, K=K, V=V, gate=gate, varlen=varlen)


def _delta_cases(quick: bool):
    for dtype in DTYPES:
        for K, V in DIMS:
            for gate in ("none", "scalar", "vector"):  # DeltaNet, Gated DeltaNet, KDA
                for varlen in (False, True):
                    if varlen and dtype != "bfloat16":
                        continue
                    yield dict(family="delta", dtype=dtype, K=K, V=V, gate=gate, varlen=varlen)


def _loglinear_cases(quick: bool):
    for dtype in DTYPES:
        for K, V in DIMS:
            for varlen in (False, True):
                if varlen and dtype != "bfloat16":
                    continue
                yield dict(family="loglinear", dtype=dtype, K=K, V=V, varlen=varlen)


def _ssm_cases(quick: bool):
    for dtype in DTYPES:
        for N in (16, 64, 128, 256):
            yield dict(family="scan", dtype=dtype, N=N)
        for N in (16, 128):
            yield dict(family="state_update", dtype=dtype, N=N)
        for W in (2, 4):
            yield dict(family="conv", dtype=dtype, W=W)


def cases(quick: bool = False, families=None, dims=None, dtypes=None):
    """Every case, or those of the given families ("gla", "delta", "loglinear", "scan",
    "state_update", "conv"), (K, V) pairs and dtypes (None: all)."""
    for c in (*_gla_cases(quick), *_delta_cases(quick), *_loglinear_cases(quick),
              *_ssm_cases(quick)):
        if families and c["family"] not in families:
            continue
        if dims and "K" in c and (c["K"], c["V"]) not in dims:
            continue
        if dtypes and c["dtype"] not in dtypes:
            continue
        yield c


def _parse_filters(a) -> dict:
    """record/check filter options -> keyword arguments of cases()."""
    return dict(families=a.family.split(",") if a.family else None,
                dims=[tuple(int(x) for x in d.split("x")) for d in a.dims.split(",")]
                if a.dims else None,
                dtypes=a.dtypes.split(",") if a.dtypes else None)


def _filter_args(a) -> list:
    """The filter options of `a` as a record command line."""
    out = []
    for opt in ("family", "dims", "dtypes"):
        if getattr(a, opt):
            out += [f"--{opt}", getattr(a, opt)]
    return out


def _run_case(c: dict):
    """Forward and backward launchers of one case on tiny CPU tensors (launches recorded)."""
    import torch
    dt = getattr(torch, c["dtype"])
    fam = c["family"]
    H, T = 1, 70
    if fam in ("gla", "delta"):
        K, V = c["K"], c["V"]
        cu = torch.tensor([0, 30, 70], dtype=torch.int32) if c["varlen"] else None
        B = 1 if cu is not None else 2
        N = 2
        q, k = torch.randn(B, T, H, K, dtype=dt), torch.randn(B, T, H, K, dtype=dt)
        v = torch.randn(B, T, H, V, dtype=dt)
        h0 = torch.randn(N, H, K, V)
        do, dht = torch.randn_like(v), torch.randn(N, H, K, V)
        if fam == "gla":
            from lightning_ops.chunk import triton as G
            gate = c["gate"]
            g = None
            if gate in ("scalar", "scalar+gamma"):
                g = -torch.rand(B, T, H, dtype=dt)
            elif gate == "vector":
                g = -torch.rand(B, T, H, K, dtype=dt)
            gg = -torch.rand(H) if "gamma" in gate else None
            for single in ("0", "1"):
                os.environ["LIGHTNING_OPS_GLA_SINGLE_PASS"] = single
                for mode in ("chunk", "recurrent"):
                    if mode == "recurrent" and single == "1":
                        continue
                    G.forward(q, k, v, g, gg, K ** -0.5, h0, True, cu, mode)
                    G.backward(q, k, v, g, gg, K ** -0.5, h0, cu, mode, do, dht)
            os.environ.pop("LIGHTNING_OPS_GLA_SINGLE_PASS", None)
        else:
            from lightning_ops.delta import triton as D
            g = {"none": None, "scalar": -torch.rand(B, T, H, dtype=dt),
                 "vector": -torch.rand(B, T, H, K, dtype=dt)}[c["gate"]]
            beta = torch.rand(B, T, H, dtype=dt)
            for mode in ("chunk", "recurrent"):
                D.forward(q, k, v, g, beta, K ** -0.5, h0, True, cu, False, mode)
            D.forward(q, k, v, g, beta, K ** -0.5, h0, True, cu, True, "recurrent")
            D.backward(q, k, v, g, beta, K ** -0.5, h0, cu, False, "chunk", do, dht)
    elif fam == "loglinear":
        # chunk_log_linear_attn's forward kernels: with an initial state and the final state,
        # and without either (other constexprs), at the default chunk (64) and the smallest (16)
        from lightning_ops.loglinear import triton as LL
        K, V = c["K"], c["V"]
        cu = torch.tensor([0, 30, 70], dtype=torch.int32) if c["varlen"] else None
        B, N, L = (1 if cu is not None else 2), 2, 20
        q, k = torch.randn(B, T, H, K, dtype=dt), torch.randn(B, T, H, K, dtype=dt)
        v, g = torch.randn(B, T, H, V, dtype=dt), -torch.rand(B, T, H, dtype=dt)
        lam = torch.rand(B, T, H, L, dtype=dt)
        h0, off = torch.randn(N, H, L, K, V), torch.tensor([5, 37])
        for C in (64, 16):
            LL.forward(q, k, v, g, lam, 1.0, h0, off, True, cu, C)
            LL.forward(q, k, v, g, lam, 1.0, None, None, False, cu, C)
        # and its backward kernels (loglinear/triton_backward.py), with and without the
        # initial state and dht, at the default chunk
        from lightning_ops.loglinear import triton_backward as LLB
        do, dht = torch.randn_like(v), torch.randn(N, H, L, K, V)  # N = B dense, 2 varlen
        LLB.backward(q, k, v, g, lam, 1.0, h0, off, cu, do, dht, 64)
        LLB.backward(q, k, v, g, lam, 1.0, None, None, cu, do, None, 64)
        # and the log-linear Gated DeltaNet's forward kernels (loglinear/triton_delta.py), with
        # the initial and final states and without either, at the default chunk (64) and the
        # smallest (16)
        from lightning_ops.loglinear import triton_delta as LLD
        beta = torch.rand(B, T, H, dtype=dt)
        for C in (64, 16):
            LLD.forward(q, k, v, g, lam, beta, 1.0, h0, off, True, cu, False, C)
        LLD.forward(q, k, v, g, lam, beta, 1.0, None, None, False, cu, False, 64)
    elif fam == "scan":
        from lightning_ops.ssm import triton as S
        N, Dm, L = c["N"], 16, T
        u, delta = torch.randn(2, Dm, L, dtype=dt), torch.rand(2, Dm, L, dtype=dt)
        A = -torch.rand(Dm, N)
        Bm, Cm = torch.randn(2, N, L, dtype=dt), torch.randn(2, N, L, dtype=dt)
        D_, z, db = torch.randn(Dm), torch.randn(2, Dm, L, dtype=dt), torch.randn(Dm)
        _, _, aux = S.scan_forward(u, delta, A, Bm, Cm, D_, z, db, True, True)
        S.scan_backward(u, delta, A, Bm, Cm, D_, z, db, True, aux, torch.randn_like(u),
                        torch.randn(2, Dm, N))
    elif fam == "state_update":
        from lightning_ops.ssm import triton as S
        N, b, Hh, P = c["N"], 2, 4, 64
        state = torch.randn(b, Hh, P, N, dtype=dt)
        x, z = torch.randn(b, Hh, P, dtype=dt), torch.randn(b, Hh, P, dtype=dt)
        dtt = torch.rand(b, Hh, 1, dtype=dt).expand(b, Hh, P)
        A = -torch.rand(Hh, 1, 1).expand(Hh, P, N)
        Bm, Cm = torch.randn(b, 1, N, dtype=dt), torch.randn(b, 1, N, dtype=dt)
        D_, dtb = torch.randn(Hh, 1).expand(Hh, P), torch.randn(Hh, 1).expand(Hh, P)
        S.state_update(state, x, dtt, A, Bm, Cm, D_, z, dtb, True)
        S.state_update(state, x, torch.rand(b, Hh, P, dtype=dt), -torch.rand(Hh, P, N), Bm, Cm,
                       None, None, None, False)
    elif fam == "conv":
        from lightning_ops.ssm import triton as S
        W, Dm, L = c["W"], 32, T
        x, w, bias = torch.randn(2, Dm, L, dtype=dt), torch.randn(Dm, W), torch.randn(Dm)
        h0 = torch.randn(2, Dm, W - 1, dtype=dt)
        seq = torch.zeros(2, L, dtype=torch.int32)
        for act, init, sq in (("silu", h0, None), (None, None, seq)):
            S.conv_forward(x, w, bias, init, sq, True, act)
            S.conv_backward(x, w, bias, init, sq, act, torch.randn_like(x), None)
        S.conv_update(x[:, :, :1], torch.randn(2, Dm, W - 1, dtype=dt), w, bias, "silu")


def record(quick: bool = False, case_list=None, kernel: str = "", **filters) -> List[dict]:
    """Distinct launches (kernel, arguments, options) over all cases, with the largest grid seen
    and the cases that produced them."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("record with TRITON_INTERPRET unset (the launchers choose GPU configs "
                           "only when not interpreting)")
    sys.path.insert(0, ROOT)
    from lightning_ops import triton_utils
    seen: Dict[str, dict] = {}
    with triton_utils.pretend_gpu(), Recorder() as rec:
        for c in (case_list if case_list is not None else cases(quick, **filters)):
            n0 = len(rec.launches)
            _run_case(c)
            for la in rec.launches[n0:]:
                if kernel and not re.search(kernel, la["kernel"].split(":")[1]):
                    continue
                ident = json.dumps([la["kernel"], la["args"], la["kwargs"]], sort_keys=True)
                if ident not in seen:
                    seen[ident] = dict(la, case=c)
    return list(seen.values())


# =============================================================================================
# compile
# =============================================================================================
class _StubDriver:
    """Enough of a Triton driver for JITFunction.warmup to compile for sm_90 without a GPU."""

    def __init__(self, arch=90, warp_size=32):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def is_active(self):
        return True


def _source_hash(fn) -> str:
    """Hash of the kernel's source and of every @triton.jit helper and plain constant it names,
    recursively (unlike Triton's cache key, no line numbers: edits elsewhere in a file do not
    invalidate a row)."""
    from triton.runtime.jit import JITFunction
    h, seen, todo = hashlib.sha256(), set(), [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        h.update(f.src.encode())
        for name in sorted(set(re.findall(r"[A-Za-z_]\w*", f.src))):
            obj = f.__globals__.get(name)
            if isinstance(obj, JITFunction):
                todo.append(obj)
            elif isinstance(obj, (int, float, str, bool)):
                h.update(f"{name}={obj!r}".encode())
    return h.hexdigest()


def _row_key(triton_version: str, fn, la: dict) -> str:
    blob = json.dumps([triton_version, _source_hash(fn), la["kernel"], la["args"], la["kwargs"]],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _config_str(la: dict) -> str:
    parts = []
    dts = sorted({a[1]["tensor"] for a in la["args"] if isinstance(a[1], dict)
                  and "tensor" in a[1] and a[1]["tensor"] != "int32"})
    parts.append("in=" + "/".join(dts))
    for k, v in la["kwargs"].items():
        if k in ("num_warps", "num_stages"):
            continue
        if isinstance(v, dict):
            v = v.get("tl", v.get("tensor"))
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _materialize(v):
    import torch
    import triton.language as tl
    from triton.runtime.jit import MockTensor
    if isinstance(v, dict):
        if "tensor" in v:
            return MockTensor(getattr(torch, v["tensor"]))
        if "tl" in v:
            return tl.str_to_ty(v["tl"]) if hasattr(tl, "str_to_ty") else getattr(tl, v["tl"])
    return v


def _tl_dtype(name: str):
    import triton.language as tl
    return {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64,
            "int32": tl.int32, "int64": tl.int64}.get(name) or getattr(tl, name)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def _compile_one(la: dict) -> dict:
    """Compile one recorded launch for sm_90; shared bytes, registers and spills."""
    import triton
    from triton.backends.nvidia import compiler as nvc
    mod, name = la["kernel"].split(":")
    fn = getattr(importlib.import_module(mod), name)
    args = []
    for _, v in la["args"]:
        if isinstance(v, dict) and "tl" in v:
            args.append(_tl_dtype(v["tl"]))
        else:
            args.append(_materialize(v))
    kwargs = {}
    for k, v in la["kwargs"].items():
        kwargs[k] = _tl_dtype(v["tl"]) if isinstance(v, dict) and "tl" in v else _materialize(v)
    logs = []
    real_run = nvc.subprocess.run

    def run(cmd, *a, **kw):  # keep ptxas -v's report (triton deletes its log file)
        r = real_run(cmd, *a, **kw)
        err = kw.get("stderr")
        if hasattr(err, "name") and "ptxas" in os.path.basename(str(cmd[0])):
            with open(err.name) as f:
                logs.append(f.read())
        return r

    nvc.subprocess.run = run
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k = fn.warmup(*args, grid=(1,), **kwargs)
    finally:
        nvc.subprocess.run = real_run
    log = "\n".join(logs)
    out = {"shared_bytes": int(k.metadata.shared), "num_stages": k.metadata.num_stages,
           "num_warps": k.metadata.num_warps}
    for f, rx in _PTXAS_RE.items():
        vals = [int(x) for x in rx.findall(log)]
        out[f] = max(vals) if vals else ("" if not log else 0)
    return out


def _risk(la: dict) -> int:
    """Larger tiles first: what a time budget leaves unchecked is the least likely to fail."""
    kw = {k: v for k, v in la["kwargs"].items() if isinstance(v, int)
          and not isinstance(v, bool)}
    # kernels without a V dim (the WY inverse) hold [64, K] tiles: rank them like V = 256
    size = kw.get("K", kw.get("D", 16)) * kw.get("V", 256) * max(1, kw.get("BN", 1) // 16)
    return -size


def compile_launches(launches: List[dict], known: Dict[str, dict], jobs: int = 1,
                     verbose: bool = True, budget_s: float = 0.0) -> List[dict]:
    """Rows of the table for these launches under this python's triton; `known` rows (by key)
    are reused, the rest compiled (in `jobs` processes)."""
    import triton
    from triton.runtime.driver import driver
    sys.path.insert(0, ROOT)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"   # ptxas must run to report registers / spills
    driver.set_active(_StubDriver())
    tv = triton.__version__
    todo, rows = [], []
    for la in launches:
        mod, name = la["kernel"].split(":")
        fn = getattr(importlib.import_module(mod), name)
        key = _row_key(tv, fn, la)
        base = {"triton": tv, "kernel": name, "config": _config_str(la), "key": key}
        if key in known:
            rows.append(dict(known[key], **base))
        else:
            todo.append((la, base))
    if verbose:
        print(f"triton {tv}: {len(launches)} configurations, {len(rows)} from the table, "
              f"{len(todo)} to compile" + (f" (budget {budget_s:.0f} s)" if budget_s else ""),
              flush=True)
    todo.sort(key=lambda t: _risk(t[0]))
    t0 = time.time()

    def finish(base, res, i):
        row = dict(base)
        if isinstance(res, Exception):
            row.update(num_warps="", num_stages="", shared_bytes="", registers="",
                       spill_store_bytes="", spill_load_bytes="",
                       fits=f"compile error: {type(res).__name__}: {str(res)[:200]}")
        else:
            row.update(res)
            row["fits"] = "yes" if res["shared_bytes"] <= SHARED_LIMIT else "NO"
        rows.append(row)
        if verbose and (i % 25 == 0 or row["fits"] != "yes"):
            print(f"  [{i + 1}/{len(todo)} {time.time() - t0:.0f}s] {row['kernel']} "
                  f"{row['config'][:90]} smem={row.get('shared_bytes')} fits={row['fits']}",
                  flush=True)

    done = 0
    if jobs <= 1:
        for i, (la, base) in enumerate(todo):
            if budget_s and time.time() - t0 > budget_s:
                break
            finish(base, _compile_safe(la), i)
            done += 1
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        pool = ctx.Pool(jobs)
        try:
            results = pool.imap(_compile_safe, [t[0] for t in todo])
            for i, (la, base) in enumerate(todo):
                left = budget_s - (time.time() - t0) if budget_s else None
                if left is not None and left <= 0:
                    break
                try:  # the budget also cuts a long compile short (a big kernel's ptxas: minutes)
                    res = results.next(timeout=left)
                except mp.TimeoutError:
                    break
                finish(base, res, i)
                done += 1
        finally:
            pool.terminate()  # its workers' ptxas children: see _run_own_group
    for la, base in todo[done:]:  # over budget: reported, not written to the table
        rows.append(dict(base, fits="unchecked"))
    return rows


def _compile_safe(la):
    try:
        return _compile_one(la)
    except Exception as e:  # a compile error is a finding, reported in the table
        return RuntimeError(f"{type(e).__name__}: {e}")


# =============================================================================================
# table, checks, CLI
# =============================================================================================
def read_table(path: str = TABLE) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_table(rows: List[dict], path: str = TABLE) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["triton"], r["kernel"], r["config"],
                                       str(r["num_warps"])))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def grid_violations(launches: List[dict]) -> List[str]:
    return [f"{la['kernel']} grid {la['grid']} ({la['case']})" for la in launches
            if la["grid"][1] > GRID_YZ_MAX or la["grid"][2] > GRID_YZ_MAX]


def failures(rows: List[dict]) -> List[str]:
    return [f"triton {r['triton']} {r['kernel']} [{r['config']}] warps={r['num_warps']} "
            f"stages={r['num_stages']}: {r['fits']} (shared {r['shared_bytes']} B)"
            for r in rows if r["fits"] != "yes"]


def _keys_main(argv):
    """keys-worker LAUNCHES_JSON OUT_JSON: the table keys of these launches under this python's
    triton and the current sources (no compile)."""
    import triton
    sys.path.insert(0, ROOT)
    launches = json.load(open(argv[0]))
    keys = []
    for la in launches:
        mod, name = la["kernel"].split(":")
        keys.append(_row_key(triton.__version__, getattr(importlib.import_module(mod), name), la))
    json.dump({"triton": triton.__version__, "keys": keys}, open(argv[1], "w"))


def prune(pythons: List[str], table: str = TABLE) -> int:
    """Drop the rows of these pythons' triton versions whose key no current launch has (kernel
    sources or launch configurations changed since): record every launch, key it under each
    python, keep the rows of other versions as they are."""
    import tempfile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    tmp = tempfile.mkdtemp(prefix="sm90-")
    lj = os.path.join(tmp, "launches.json")
    r = subprocess.run([sys.executable, __file__, "record", "--out", lj], env=env)
    if r.returncode:
        return r.returncode
    current = {}
    for py in pythons:
        kj = os.path.join(tmp, "keys.json")
        r = subprocess.run([py, __file__, "keys-worker", lj, kj], env=env)
        if r.returncode:
            return r.returncode
        got = json.load(open(kj))
        current[got["triton"]] = set(got["keys"])
    old = read_table(table)
    rows = [r for r in old if r["triton"] not in current or r["key"] in current[r["triton"]]]
    write_table(rows, table)
    print(f"pruned {len(old) - len(rows)} stale rows; {len(rows)} left", flush=True)
    return 0


def _worker_main(argv):
    """compile-worker LAUNCHES_JSON KNOWN_JSON OUT_JSON JOBS BUDGET_S (under any python)."""
    launches = json.load(open(argv[0]))
    known = json.load(open(argv[1]))
    rows = compile_launches(launches, known, jobs=int(argv[3]),
                            budget_s=float(argv[4]) if len(argv) > 4 else 0.0)
    json.dump(rows, open(argv[2], "w"))


def _run_own_group(cmd: List[str], env: dict) -> subprocess.CompletedProcess:
    """Run cmd in its own process group and kill what is left of the group when it returns: a
    time budget ends the worker pool with terminate(), which does not reach the ptxas processes
    the workers started (a large kernel's ptxas runs for minutes, orphaned, on a CPU the rest
    of the test suite needs)."""
    import signal
    p = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = p.wait()
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(cmd, rc)


def check(pythons: List[str], jobs: int, table: str = TABLE, quick: bool = False,
          launches_json: str = "", budget_s: float = 0.0, strict: bool = False,
          record_args=()) -> int:
    """Record, compile under each python, merge into the table; 1 on a configuration over the
    shared-memory limit, a compile error, a grid over the y/z limit, or (strict) any
    configuration left unchecked by the time budget."""
    import tempfile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    tmp = tempfile.mkdtemp(prefix="sm90-")
    lj = launches_json or os.path.join(tmp, "launches.json")
    if not launches_json:
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "record", "--out", lj]
                           + (["--quick"] if quick else []) + list(record_args), env=env)
        if r.returncode:
            return r.returncode
        print(f"recorded in {time.time() - t0:.0f}s", flush=True)
    launches = json.load(open(lj))
    old = read_table(table)
    all_rows, status = [], 0
    for py in pythons:
        known = {r["key"]: r for r in old if r.get("fits") == "yes" or
                 r.get("fits") == "NO"}  # compile errors are retried
        kj, oj = os.path.join(tmp, "known.json"), os.path.join(tmp, "rows.json")
        json.dump(known, open(kj, "w"))
        r = _run_own_group([py, __file__, "compile-worker", lj, kj, oj, str(jobs),
                            str(budget_s)], env=env)
        if r.returncode:
            print(f"compile worker under {py} failed (exit {r.returncode})", flush=True)
            status = 1
            continue
        all_rows += json.load(open(oj))
    unchecked = [r for r in all_rows if r["fits"] == "unchecked"]
    all_rows = [r for r in all_rows if r["fits"] != "unchecked"]
    versions = {r["triton"] for r in all_rows} | {r["triton"] for r in unchecked}
    # rows of other triton versions (e.g. 3.6 when its env is missing here) stay in the table
    keep = [r for r in old if r["triton"] not in versions]
    # rows of this version not recorded this time (e.g. a --quick run) stay too
    seen = {r["key"] for r in all_rows} | {r["key"] for r in unchecked}
    keep += [r for r in old if r["triton"] in versions and r["key"] not in seen]
    write_table(keep + all_rows, table)
    bad = failures(all_rows)
    gv = grid_violations(launches)
    for line in bad + gv:
        print("FAIL", line, flush=True)
    if unchecked:
        print(f"{'FAIL' if strict else 'NOTE'}: {len(unchecked)} configurations not compiled "
              f"within the {budget_s:.0f} s budget (the table lacks them): run "
              f"`python tools/sm90_resources.py check` without a budget and commit the table",
              flush=True)
    print(f"table: {os.path.relpath(table, ROOT)} ({len(keep) + len(all_rows)} rows; "
          f"triton {', '.join(sorted(versions | {r['triton'] for r in keep}))})", flush=True)
    return 1 if (bad or gv or status or (strict and unchecked)) else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compile-worker":
        return _worker_main(argv[1:])
    if argv and argv[0] == "keys-worker":
        return _keys_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--quick", action="store_true")
    pr = sub.add_parser("prune", help="drop rows no current launch has (after kernel edits)")
    pr.add_argument("--python", action="append", default=[])
    pr.add_argument("--table", default=TABLE)
    c = sub.add_parser("check")
    for sp in (r, c):  # a subset (e.g. to check a fix quickly; pass --table to keep the
        # committed table as it is)
        sp.add_argument("--family", default="", help="comma-separated families: gla, delta, "
                        "loglinear, scan, state_update, conv (default: all)")
        sp.add_argument("--dims", default="", help="comma-separated KxV pairs, e.g. 128x128")
        sp.add_argument("--dtypes", default="", help="comma-separated: float32,float16,bfloat16")
        sp.add_argument("--kernel", default="", help="regex on kernel names (e.g. 'wy_|delta_')")
    c.add_argument("--python", action="append", default=[],
                   help="interpreters to compile under (default: this one)")
    c.add_argument("--jobs", type=int, default=1)
    c.add_argument("--table", default=TABLE)
    c.add_argument("--launches", default="", help="reuse a recorded launches JSON")
    c.add_argument("--budget-s", type=float, default=0.0,
                   help="stop compiling after this long per triton (0: no limit)")
    c.add_argument("--strict", action="store_true", help="configurations left over fail")
    a = p.parse_args(argv)
    if a.cmd == "prune":
        return prune(a.python or [sys.executable], a.table)
    if a.cmd == "record":
        t0 = time.time()
        la = record(quick=a.quick, kernel=a.kernel, **_parse_filters(a))
        json.dump(la, open(a.out, "w"))
        print(f"{len(la)} distinct launches recorded in {time.time() - t0:.0f}s", flush=True)
        return 0
    return check(a.python or [sys.executable], a.jobs, a.table, launches_json=a.launches,
                 budget_s=a.budget_s, strict=a.strict,
                 record_args=_filter_args(a) + (["--kernel", a.kernel] if a.kernel else []))


if __name__ == "__main__":
    sys.exit(main())
