"""`python -m benchmarks`: run the registry, print the table and the summary, append the CSV,
draw the plots, optionally compare with another git revision.

  python -m benchmarks                      CPU suite (fp32, B=1 H=4 K=V=64, T=1024/4096 for every
                                            op, plus issue 2's targets: chunk_gla vs SDPA at
                                            T=16384 and vs the reference at T=4096); < 3 min
  python -m benchmarks --gpu-suite --out D  GPU suite (bf16, B=2 H=16 K=V=128, T=2K..16K, fwd /
                                            bwd / fwd+bwd, every backend and peer); < 8 min
  python -m benchmarks --quick              tiny shapes, seconds (a smoke test)
  python -m benchmarks --op chunk_gla --provider ours-torch,sdpa --T 2048,8192 --mode fwd
  python -m benchmarks --compare HEAD~1     the same cases at another revision; prints speedups
  python -m benchmarks --list               ops, providers and why unavailable ones are
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import env, registry, report, roofline, timing
from .registry import DTYPES, MODES, OPS, PROVIDERS, Case, Config, main_output
from .report import Result

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _csv_list(kind, choices=None):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        out = []
        for x in items:
            x = kind(x)
            if choices is not None and x not in choices:
                raise argparse.ArgumentTypeError(f"{x!r} is not one of {', '.join(choices)}")
            out.append(x)
        return out
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", type=_csv_list(str, list(OPS)), action="extend",
                   help="ops to run (comma list; default all)")
    p.add_argument("--provider", type=_csv_list(str, list(PROVIDERS)), action="extend",
                   help=f"providers (comma list of {', '.join(PROVIDERS)}; default all "
                        f"available but the reference)")
    p.add_argument("--dtype", type=_csv_list(str, list(DTYPES)), action="extend",
                   help="fp32, bf16, fp16 (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--T", type=_csv_list(int), action="extend",
                   help="sequence lengths (comma list; replaces the suite's, drops its extras)")
    p.add_argument("--mode", type=_csv_list(str, list(MODES)), action="extend",
                   help="fwd, bwd, fwd+bwd (default fwd,fwd+bwd on CPU, all on GPU)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    p.add_argument("--gpu-suite", action="store_true", help="the GPU suite (bf16, big shapes)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the suite's device")
    p.add_argument("--out", help=f"folder for results.csv, bench.log, plots/ (default "
                                 f"{os.path.relpath(RESULTS_DIR)})")
    p.add_argument("--compare", metavar="REV", help="also run the same cases at git revision "
                                                    "REV (in a temporary worktree); print speedups")
    p.add_argument("--max-case-s", type=float, help="skip a case predicted to take longer")
    p.add_argument("--budget-s", type=float, help="time budget of the whole run")
    p.add_argument("--list", action="store_true", help="list ops and providers, then exit")
    p.add_argument("--no-csv", action="store_true", help="do not append to results.csv")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring device peaks")
    p.add_argument("--no-err", action="store_true", help="skip the accuracy check")
    p.add_argument("--json-out", help=argparse.SUPPRESS)  # used by --compare's child run
    return p.parse_args(argv)


class Log:
    """Print to stdout and to the run's log file."""

    def __init__(self, path: Optional[str]):
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "w")

    def __call__(self, msg: str = "", console: bool = True) -> None:
        if console:
            print(msg, flush=True)
        if self.f:
            self.f.write(msg + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


class Progress:
    """tqdm when installed, else one plain line per case."""

    def __init__(self, total: int, log: Log):
        self.log, self.total, self.i = log, total, 0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)
        except Exception:  # noqa: BLE001 - bare GPU machines may lack tqdm
            self.bar = None

    def start(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc)

    def done(self, line: str) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)
            self.log(f"[{self.i}/{self.total}] {line}", console=False)
        else:
            self.log(f"[{self.i}/{self.total}] {line}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# Accuracy: one check per (op, provider) at a small shape, against the float64 reference
# ------------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    if e.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


class Accuracy:
    """max over (output, every input gradient) of max|a - e| / max|e|, where e comes from
    lightning_ops.reference in float64 on the same (rounded) inputs, at `cfg`."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.cache: Dict[Tuple, Tuple[float, str]] = {}
        self.refs: Dict[str, Tuple] = {}

    def header(self, dtypes: Sequence[str]) -> str:
        c = self.cfg
        return (f"max rel err: max|x - ref| / max|ref| over the output and every input gradient, "
                f"vs lightning_ops.reference in float64 at a small shape (B{c.B} T{c.T} H{c.H} "
                f"K{c.K} V{c.V}), inputs in the bench dtype ({', '.join(dtypes)}); SDPA vs "
                f"float64 softmax attention; '!' marks errors above 1e-3 (fp32) / 5e-2 (16-bit)")

    def __call__(self, case: Case, run) -> Tuple[float, str]:
        spec = case.spec
        key = (spec.name, case.provider, case.dtype)
        if key not in self.cache:
            try:
                self.cache[key] = (self._measure(spec, run, DTYPES[case.dtype]), "")
            except timing.CaseTimeout:
                raise
            except Exception as e:  # noqa: BLE001 - reported, the timing still runs
                self.cache[key] = (float("nan"), f"accuracy check failed: {_short(e)}")
        return self.cache[key]

    def _measure(self, spec, run, dtype) -> float:
        d = spec.dims(self.cfg)
        kwargs = spec.kwargs(d)
        inputs = spec.make_inputs(self.cfg, dtype, self.device, seed=7, grad=True)
        gen = torch.Generator().manual_seed(8)
        do64 = torch.randn(spec.shape_of(spec.output, d), generator=gen, dtype=torch.float64)
        rkey = (spec.name, dtype)  # the reference sees the same rounded inputs
        if rkey not in self.refs:
            ref_in = {k: v.detach().double().cpu().requires_grad_(v.requires_grad)
                      for k, v in inputs.items()}
            ro = main_output(spec.reference(ref_in, kwargs))
            leaves = [v for v in ref_in.values() if v.requires_grad]
            rg = torch.autograd.grad(ro, leaves, do64, allow_unused=True)
            self.refs[rkey] = (ro.detach(), list(rg))
        ro, rg = self.refs[rkey]
        o = main_output(run(inputs, kwargs))
        leaves = [v for v in inputs.values() if v.requires_grad]
        gs = torch.autograd.grad(o, leaves, do64.to(o.device, o.dtype), allow_unused=True)
        err = _rel(o, ro)
        for g, r in zip(gs, rg):
            if r is not None:
                err = max(err, _rel(torch.zeros_like(r) if g is None else g, r))
        return err


def _short(e: BaseException, n: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}".splitlines()[0]
    return msg if len(msg) <= n else msg[:n - 3] + "..."


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, s: registry.Suite, device: torch.device, info: Dict[str, str],
                 peaks: Optional[roofline.Peaks], acc: Optional[Accuracy], log: Log,
                 max_case_s: float, budget_s: float, t0: Optional[float] = None):
        self.s, self.device, self.info, self.peaks, self.acc, self.log = \
            s, device, info, peaks, acc, log
        self.max_case_s, self.budget_s = max_case_s, budget_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.once_over_s = max(2 * s.target_s, 1.0)
        self.done: Dict[Tuple, Result] = {}
        self.warmed: set = set()
        self.history: Dict[Tuple, List[Tuple[int, float]]] = {}

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def predict(self, case: Case) -> Optional[float]:
        """Seconds one call will take. From smaller T of the same (op, provider, mode):
        t * (T / T0)^p, p fitted on the last two sizes and clamped to [1, 2], p = 2 from one size
        (conservative) unless the forward's growth is known. Else, from the forward at this T:
        bwd ~ 2x, fwd+bwd ~ 3x the forward."""
        def exponent(h) -> Optional[float]:
            if len(h) >= 2:
                (T0, t0), (T1, t1) = h[-2], h[-1]
                if T1 > T0 and t0 > 0 and t1 > 0:
                    return min(2.0, max(1.0, math.log(t1 / t0) / math.log(T1 / T0)))
            return None

        h = [x for x in self.history.get(self._hkey(case), []) if x[0] <= case.cfg.T]
        if h:
            (T1, t1) = h[-1]
            p = exponent(h)
            if p is None and case.provider != "reference":
                # one size of this mode: borrow the forward's growth (our ops' backward is
                # Python-level code the time limit can still stop, unlike the reference's)
                p = exponent([x for x in self.history.get(self._hkey(case, "fwd"), [])
                              if x[0] <= case.cfg.T])
            return t1 * (case.cfg.T / T1) ** (2.0 if p is None else p)
        if case.mode != "fwd":
            f = dict(self.history.get(self._hkey(case, "fwd"), []))
            if case.cfg.T in f:
                return f[case.cfg.T] * (2.0 if case.mode == "bwd" else 3.0)
        return None

    @staticmethod
    def _hkey(case: Case, mode: Optional[str] = None) -> Tuple:
        return (case.key()[0], case.provider, mode or case.mode, case.dtype,
                case.cfg.B, case.cfg.H, case.cfg.K, case.cfg.V)

    def _result(self, case: Case, **kw) -> Result:
        spec = case.spec
        c = case.cfg
        return Result(op=case.op, provider=case.provider, mode=case.mode,
                      shape=spec.shape_label(c), T=c.T, dtype=case.dtype,
                      B=c.B, H=c.H, K=c.K, V=c.V, **self.info, **kw)

    def _warm(self, case: Case, run) -> None:
        """One small fwd+bwd call per (op, provider, dtype) before its first timing, so one-time
        costs (imports, op registration, caches) are not timed (the accuracy check does this
        when it runs)."""
        key = (case.spec.name, case.provider, case.dtype)
        if key in self.warmed or case.provider == "reference":
            return
        self.warmed.add(key)
        small = Case(case.op, case.provider, self.s.err_cfg, "fwd+bwd", case.dtype)
        try:
            timing.build_step(small, case.spec, run, self.device, 1)(0)
        except Exception:  # noqa: BLE001 - the timed call will report the failure
            pass

    def _isolated(self, case: Case, limit: float) -> timing.Timing:
        """Time a case in a child process that is killed at `limit` seconds."""
        import subprocess
        job = {"op": case.op, "provider": case.provider, "cfg": case.cfg.__dict__,
               "mode": case.mode, "dtype": case.dtype, "device": str(self.device)}
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        import lightning_ops
        lib = os.path.dirname(os.path.dirname(os.path.abspath(lightning_ops.__file__)))
        env_ = dict(os.environ)
        env_["PYTHONPATH"] = os.pathsep.join(
            x for x in (here, lib, env_.get("PYTHONPATH")) if x)
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks._worker"],
                                  input=json.dumps(job), text=True, capture_output=True,
                                  timeout=limit, env=env_, cwd=here)
        except subprocess.TimeoutExpired:
            raise timing.CaseTimeout(f"ran past {limit:.0f} s (stopped)")
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                               else f"worker exited with {proc.returncode}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        return timing.Timing(got["times"], got["peak_mb"], got["note"] + " (in a child process)")

    def run_case(self, case: Case) -> Result:
        key = case.key()
        if key in self.done:  # SDPA: one measurement serves every op at this shape
            prev = self.done[key]
            return Result(**{**prev.__dict__, "op": case.op})
        limit = min(self.max_case_s, self.remaining())
        if limit <= 1:
            return self._result(case, status="skipped", note="out of the run's time budget")
        isolate = case.provider == "reference"
        if isolate:  # it may well run to its limit: leave half the time to the cases after it
            limit = min(limit, max(self.remaining() / 2, 1.0))
        pred = self.predict(case)
        # what the case needs at least: one call when slow (or isolated), else warm-up + 1 rep
        need = None if pred is None else (
            pred if isolate or pred >= self.once_over_s else pred * (1 + self.s.warmup))
        if need is not None and need > limit:
            why = "the run's remaining budget" if limit < self.max_case_s else "the per-case cap"
            return self._result(case, status="skipped",
                                note=f"predicted ~{pred:.0f} s per call, over {limit:.0f} s "
                                     f"({why}; raise with --max-case-s/--budget-s)")
        run = registry.provider_function(case.provider, OPS[case.op])
        spec = case.spec
        dtype = DTYPES[case.dtype]
        err, err_note = float("nan"), ""
        t0 = time.monotonic()
        try:
            with timing.time_limit(limit):
                if self.acc is not None:  # also the one-time warm-up of this (op, provider)
                    err, err_note = self.acc(case, run)
                else:
                    self._warm(case, run)
            if isolate:
                t = self._isolated(case, max(1.0, limit - (time.monotonic() - t0)))
            else:
                with timing.time_limit(limit - (time.monotonic() - t0)):
                    set_bytes = spec.bytes(case.cfg, dtype, "fwd")
                    sets = timing.n_input_sets(set_bytes, self.device)
                    step = timing.build_step(case, spec, run, self.device, sets)
                    t = timing.measure(
                        step, self.device, warmup=self.s.warmup, min_reps=self.s.min_reps,
                        max_reps=self.s.max_reps, target_s=self.s.target_s,
                        once_over_s=self.once_over_s, deadline=t0 + max(limit - 1, 0))
        except timing.CaseTimeout as e:
            self.history.setdefault(self._hkey(case), []).append((case.cfg.T, limit))
            return self._result(case, status="timeout", note=str(e), max_rel_err=err)
        except Exception as e:  # noqa: BLE001 - one broken op must not end the run
            return self._result(case, status="error", note=_short(e), max_rel_err=err)
        finally:
            step = None  # noqa: F841 - free the input sets and graphs before the next case
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        med = t.median_s
        self.history.setdefault(self._hkey(case), []).append((case.cfg.T, med))
        flops, nbytes = spec.flops(case.cfg, case.mode), spec.bytes(case.cfg, dtype, case.mode)
        ach = roofline.achieved(flops, nbytes, med, self.peaks)
        note = "; ".join(x for x in (t.note, err_note) if x)
        r = self._result(case, median_ms=1e3 * med, p20_ms=1e3 * t.p20_s, p80_ms=1e3 * t.p80_s,
                         reps=t.reps, tokens_per_s=spec.tokens(case.cfg) / med,
                         peak_mb=t.peak_mb, max_rel_err=err, flops=flops, bytes=nbytes,
                         note=note, **ach)
        self.done[key] = r
        return r

    def run(self, cases: Sequence[Case]) -> List[Result]:
        prog = Progress(len(cases), self.log)
        out = []
        try:
            for c in cases:
                prog.start(f"{c.op} {c.provider} T{c.cfg.T} {c.mode}")
                r = self.run_case(c)
                out.append(r)
                ms = f"{r.median_ms:.3g} ms" if r.status == "ok" else f"{r.status} {r.note}"
                prog.done(f"{c.op} {c.provider} {r.shape} {c.mode} {c.dtype}: {ms}")
        finally:
            prog.close()
        return out


# ------------------------------------------------------------------------------------------------
def _group_notes(notes: Sequence[str]) -> List[str]:
    """'op: provider skipped: why' lines, merged when the provider and reason repeat."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    plain = []
    for n in notes:
        try:
            op, rest = n.split(": ", 1)
            prov, why = rest.split(" skipped: ", 1)
        except ValueError:
            plain.append(n)
            continue
        groups.setdefault((prov, why), []).append(op)
    lines = [f"{prov} skipped for {', '.join(ops) if len(ops) < len(OPS) else 'every op'}: {why}"
             for (prov, why), ops in groups.items()]
    return lines + plain


def list_all(device: torch.device) -> None:
    for name, op in OPS.items():
        print(f"{name}:")
        for p in PROVIDERS:
            why = registry.provider_missing(p, op, device)
            print(f"   {p:14s} {'available' if why is None else 'unavailable: ' + why}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    name = "quick" if args.quick else ("gpu" if args.gpu_suite else "cpu")
    s = registry.suite(name)
    dev = args.device or ("cuda" if args.gpu_suite else s.device)
    if dev == "cuda" and not torch.cuda.is_available():
        print("error: a CUDA device was asked for (--gpu-suite / --device cuda) but torch sees "
              "none", file=sys.stderr)
        return 2
    device = torch.device(dev)
    if device.type == "cuda" and name == "quick":
        s.dtype = "bf16"
    if args.list:
        list_all(device)
        return 0
    out = args.out or RESULTS_DIR
    log = Log(None if args.json_out else os.path.join(out, "bench.log"))
    t_start = time.monotonic()
    try:
        return _run(args, s, device, out, log, t_start)
    finally:
        log.close()


def _run(args, s, device, out, log, t_start) -> int:
    ops = args.op or list(OPS)
    modes = args.mode or list(s.modes)
    Ts = args.T or list(s.Ts)
    dtypes = args.dtype or [s.dtype]
    info = env.run_info(device)
    log(f"lightning_ops benchmarks: suite={s.name} device={info['device']} torch={info['torch']} "
        f"triton={info['triton']} rev={info['git_rev']} date={info['date']}")
    log(f"config: B={s.base.B} H={s.base.H} K={s.base.K} V={s.base.V} T={Ts} modes={modes} "
        f"dtypes={dtypes}" + ("" if args.T or not s.extra else " + " + ", ".join(
            f"{op} {p} T={T}{' ' + '/'.join(ms) if ms else ''}" for op, p, T, ms in s.extra)))
    if device.type == "cpu" and torch.cuda.is_available() and not args.device:
        log("(a CUDA device is present: `--gpu-suite` benchmarks it)")
    peaks = None
    if not args.no_roofline:
        peaks = roofline.measure_peaks(device, DTYPES[dtypes[0]], quick=s.name == "quick")
        log(f"device peaks (measured now): {peaks.what}")
    cases, notes = registry.plan(s, ops, args.provider, modes, Ts, dtypes, device,
                                 extras=args.T is None)
    for n in _group_notes(notes):
        log(f"note: {n}")
    acc = None if args.no_err else Accuracy(s.err_cfg, device)
    runner = Runner(s, device, info, peaks, acc, log,
                    args.max_case_s or s.max_case_s, args.budget_s or s.budget_s, t0=t_start)
    results = runner.run(cases)
    log(report.table(results, acc.header(dtypes) if acc else ""))
    log("")
    log("timing: median of repeats (p20-p80), warm-up first, inputs rotated across repeats; "
        + ("CUDA events" if device.type == "cuda" else "wall clock")
        + "; TFLOP/s, GB/s, % floor (of the measured copy bandwidth) and % comp (of the "
          "measured matmul peak) are for the main mode; formulas in benchmarks/registry.py; "
        + ("peak MB: allocator peak above the inputs" if device.type == "cuda" else
           "peak MB: growth of the process's resident memory (approximate: reused memory "
           "reads as 0)"))
    lines = report.summary(results)
    if s.name == "cpu":
        lines += report.cpu_targets(results)
    log("summary (our fastest backend vs each peer, same op, shape and mode; >1x = we are "
        "faster):" if lines else "summary: no peer measured alongside our ops")
    for line in lines:
        log("  " + line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report.to_dicts(results), f)
    else:
        if not args.no_csv:
            n = report.write_csv(os.path.join(out, "results.csv"), results)
            log(f"appended {n} rows to {os.path.join(out, 'results.csv')}")
        if not args.no_plots:
            paths, why = report.plot(results, os.path.join(out, "plots"))
            log(why or f"wrote {len(paths)} plots to {os.path.join(out, 'plots')}")
    if args.compare:
        from . import compare
        compare.run(args, results, log)
    log(f"done in {time.monotonic() - t_start:.0f} s")
    return 0
