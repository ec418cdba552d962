"""`python -m benchmarks`: time lightning_ops against its peers, print the table and a summary,
write the CSV, plots and (with --report) a Markdown page into a results folder.

  python -m benchmarks                      CPU suite: fp32, B=1 H=4 K=V=64, T=256/1024/4096 for
                                            every op, chunk_gla vs SDPA at T=16384 (a few minutes)
  python -m benchmarks --quick              tiny shapes, seconds (a smoke test)
  python -m benchmarks --threads 1          torch CPU threads (default: the physical cores)
  python -m benchmarks --op chunk_gla --provider ours-torch,sdpa --T 2048,8192 --mode fwd
  python -m benchmarks --compare HEAD~1     current tree vs a revision, interleaved A B A B ...,
                                            speedups with 95 % intervals
  python -m benchmarks --report             also write report.md (table + plots) for this run
  python -m benchmarks --report-from F.csv  only render report.md from an earlier results.csv
  python -m benchmarks --save               also append the rows to the committed
                                            benchmarks/results/results.csv (clean checkouts only)
  python -m benchmarks --gpu-suite          GPU suite: bf16, B=2 H=16 K=V=128, T=2K..16K
  python -m benchmarks --list               ops, providers and why unavailable ones are

Every run writes into benchmarks/runs/<date-time>/ (untracked) unless --out says otherwise.
Timing: torch.utils.benchmark.Timer on CPU, triton.testing.do_bench on GPU; each row gives the
median per call with its 95 % bootstrap interval, the p20-p80 spread, the threads it ran with and
how many cores other processes used meanwhile (rows where they took cores we needed are 'noisy').
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import env, load, registry, report, roofline, stats, timing
from .registry import DTYPES, MODES, OPS, OURS, PROVIDERS, Case, Config, main_output
from .report import Result

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")   # curated, committed (--save)
RUNS_DIR = os.path.join(HERE, "runs")          # every run, untracked

log = logging.getLogger("benchmarks")


def _csv_list(kind, choices=None):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        out = []
        for x in items:
            try:
                x = kind(x)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{x!r} is not a {kind.__name__}")
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
                   help=f"providers (comma list of {', '.join(PROVIDERS)}; default every "
                        f"available one but the reference). One that cannot run is an error.")
    p.add_argument("--dtype", type=_csv_list(str, list(DTYPES)), action="extend",
                   help="fp32, bf16, fp16 (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--T", type=_csv_list(int), action="extend",
                   help="sequence lengths (comma list; replaces the suite's, drops its extras)")
    p.add_argument("--mode", type=_csv_list(str, list(MODES)), action="extend",
                   help="fwd, bwd, fwd+bwd (default fwd,fwd+bwd on CPU, all on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: the physical cores, "
                        f"{load.physical_cores()} here)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    p.add_argument("--gpu-suite", action="store_true", help="the GPU suite (bf16, big shapes)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the suite's device")
    p.add_argument("--out", help="folder for results.csv, bench.log, plots/, report.md "
                                 "(default benchmarks/runs/<date-time>/)")
    p.add_argument("--save", action="store_true",
                   help="also append the rows to benchmarks/results/results.csv and copy the "
                        "plots to benchmarks/results/plots/ (to be committed; needs a clean "
                        "checkout)")
    p.add_argument("--report", action="store_true", help="also write report.md (Markdown)")
    p.add_argument("--report-from", metavar="CSV",
                   help="render report.md (and plots) from an earlier results.csv; no timing")
    p.add_argument("--compare", metavar="REV",
                   help="time the same cases in the current tree and at git revision REV, "
                        "interleaved; print speedups with 95%% intervals")
    p.add_argument("--rounds", type=int, default=4,
                   help="interleaved rounds per case (default 4: A B A B A B A B): the "
                        "providers of one case (ours, SDPA, ...) or, with --compare, the two "
                        "revisions; speedups come from the paired rounds")
    p.add_argument("--max-case-s", type=float, help="skip a case predicted to take longer")
    p.add_argument("--budget-s", type=float, help="time budget of the whole run")
    p.add_argument("--list", action="store_true", help="list ops and providers, then exit")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring device peaks")
    p.add_argument("--no-err", action="store_true", help="skip the accuracy check")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per case")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (an interval needs samples from several rounds)")
    return args


def _setup_logging(quiet: bool) -> logging.Handler:
    log.setLevel(logging.INFO)
    log.propagate = False
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    return h


def _log_to_file(path: str) -> logging.Handler:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    h = logging.FileHandler(path, mode="w")
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    return h


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
    lightning_ops.reference in float64 on the same (rounded) inputs, at `cfg`. Ops without
    differentiable inputs (decode steps): the output and the states they write in place."""

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
            rg = torch.autograd.grad(ro, leaves, do64, allow_unused=True) if leaves else ()
            self.refs[rkey] = (ro.detach(), list(rg), {n: ref_in[n].detach() for n in spec.writes})
        ro, rg, rw = self.refs[rkey]
        o = main_output(run(inputs, kwargs))
        leaves = [v for v in inputs.values() if v.requires_grad]
        gs = torch.autograd.grad(o, leaves, do64.to(o.device, o.dtype), allow_unused=True) \
            if leaves else ()
        err = _rel(o, ro)
        for g, r in zip(gs, rg):
            if r is not None:
                err = max(err, _rel(torch.zeros_like(r) if g is None else g, r))
        for n, r in rw.items():  # a state written in place
            err = max(err, _rel(inputs[n], r))
        return err


def _short(e: BaseException, n: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}".splitlines()[0]
    return msg if len(msg) <= n else msg[:n - 3] + "..."


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, s: registry.Suite, device: torch.device, info: Dict[str, str],
                 peaks: Optional[roofline.Peaks], acc: Optional[Accuracy], threads: int,
                 max_case_s: float, budget_s: float, t0: Optional[float] = None,
                 quiet: bool = False, rounds: int = 4):
        self.s, self.device, self.info, self.peaks, self.acc, self.threads = \
            s, device, info, peaks, acc, threads
        self.quiet = quiet
        self.rounds = rounds
        self.grouped: Dict[Case, Result] = {}   # results of cases timed in interleaved groups
        self.monitor: Optional[load.Monitor] = None
        self.max_case_s, self.budget_s = max_case_s, budget_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.once_over_s = s.once_over_s
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
                      B=c.B, H=c.H, K=c.K, V=c.V, threads=self.threads, **self.info, **kw)

    def _warm(self, case: Case, run) -> None:
        """One small fwd+bwd call per (op, provider, dtype) before its first timing, so one-time
        costs (imports, op registration, caches) are not timed (the accuracy check does this
        when it runs)."""
        key = (case.spec.name, case.provider, case.dtype)
        if key in self.warmed or case.provider == "reference":
            return
        self.warmed.add(key)
        modes = case.spec.modes
        small = Case(case.op, case.provider, self.s.err_cfg,
                     "fwd+bwd" if "fwd+bwd" in modes else modes[0], case.dtype)
        try:
            timing.build_step(small, case.spec, run, self.device, 1)(0)
        except Exception:  # noqa: BLE001 - the timed call will report the failure
            pass

    def _isolated(self, case: Case, limit: float) -> timing.Timing:
        """Time a case in a child process that is killed at `limit` seconds."""
        import subprocess
        job = {"op": case.op, "provider": case.provider, "cfg": case.cfg.__dict__,
               "mode": case.mode, "dtype": case.dtype, "device": str(self.device),
               "threads": self.threads, "once": True}
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        import lightning_ops
        lib = os.path.dirname(os.path.dirname(os.path.abspath(lightning_ops.__file__)))
        env_ = dict(os.environ)
        # a fresh process picks its OpenMP wait policy at start: sleeping idle threads, so a
        # worker never spin-waits against the other processes of a small, busy machine
        env_.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
        from ._worker import REPLY
        lines = [x for x in proc.stdout.splitlines() if x.startswith(REPLY)]
        if not lines:
            raise RuntimeError("the child process gave no timing")
        got = json.loads(lines[-1][len(REPLY):])
        return timing.Timing(got["times"], got["peak_mb"], got["note"] + " (in a child process)",
                             once=True, others=got["others"], noisy=got["noisy"])

    def run_case(self, case: Case) -> Result:
        key = case.key()
        if key in self.done:  # SDPA: one measurement (or one failure) serves every op
            prev = self.done[key]
            return Result(**{**prev.__dict__, "op": case.op})
        r = self._run_case(case)
        self.done[key] = r
        return r

    def _run_case(self, case: Case) -> Result:
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
            pred if isolate or pred >= self.once_over_s else pred * 6)  # warm-up + 5 calls
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
                    left = limit - (time.monotonic() - t0)
                    t = timing.measure(
                        step, self.device, threads=self.threads, min_time_s=self.s.min_time_s,
                        max_time_s=max(min(self.s.max_time_s, left / 3), 0.01),
                        once_over_s=self.once_over_s)
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
        return self._ok_result(case, t, err, err_note, t0)

    def _ok_result(self, case: Case, t: timing.Timing, err: float, err_note: str, t0: float,
                   **extra) -> Result:
        spec = case.spec
        dtype = DTYPES[case.dtype]
        med = t.median_s
        if t.others != t.others and self.monitor is not None:  # too short to sample alone
            t.others = self.monitor.around(t0, time.monotonic())
            t.noisy = load.is_noisy(t.others, self.threads)
        self.history.setdefault(self._hkey(case), []).append((case.cfg.T, med))
        flops, nbytes = spec.flops(case.cfg, case.mode), spec.bytes(case.cfg, dtype, case.mode)
        ach = roofline.achieved(flops, nbytes, med, self.peaks)
        if t.noisy:
            t.note = "; ".join(x for x in (t.note, f"noisy: other processes used "
                                                   f"{t.others:.1f} cores meanwhile") if x)
        if ach.get("pct_compute", 0) > 100:
            t.note = "; ".join(x for x in (t.note, "above the measured compute peak (the peak "
                                                   "was measured while the machine was busy)")
                               if x)
        note = "; ".join(x for x in (t.note, err_note) if x)
        lo, hi = t.ci_s
        r = self._result(case, median_ms=1e3 * med, p20_ms=1e3 * t.p20_s, p80_ms=1e3 * t.p80_s,
                         ci_lo_ms=1e3 * lo, ci_hi_ms=1e3 * hi, others=t.others, noisy=t.noisy,
                         reps=t.reps, tokens_per_s=spec.tokens(case.cfg) / med,
                         peak_mb=t.peak_mb, max_rel_err=err, flops=flops, bytes=nbytes,
                         note=note, **ach, **extra)
        return r

    # --------------------------------------------------------------------------------------
    # The providers of one case, interleaved: A B A B ... rounds, speedups from paired rounds
    # --------------------------------------------------------------------------------------
    @staticmethod
    def groups(cases: Sequence[Case]) -> Dict[Case, Tuple[Case, ...]]:
        """case -> the cases timed together with it: same op, shape, mode and dtype, every
        provider but the reference (timed alone, in a child process), when there are two or
        more of them."""
        by: Dict[Tuple, List[Case]] = {}
        for c in cases:
            if c.provider != "reference":
                by.setdefault((c.op, c.cfg, c.mode, c.dtype), []).append(c)
        return {c: tuple(g) for g in by.values() if len(g) > 1 for c in g}

    def _skip_reason(self, case: Case, limit: float) -> Optional[str]:
        if limit <= 1:
            return "out of the run's time budget"
        pred = self.predict(case)
        # what the case needs at least: one call when slow, else warm-up + a call per round
        need = None if pred is None else (
            pred if pred >= self.once_over_s else pred * (2 + self.rounds))
        if need is not None and need > limit:
            why = "the run's remaining budget" if limit < self.max_case_s else "the per-case cap"
            return (f"predicted ~{pred:.0f} s per call, over {limit:.0f} s ({why}; raise with "
                    f"--max-case-s/--budget-s)")
        return None

    def run_group(self, group: Sequence[Case]) -> Dict[Case, Result]:
        """Time the providers of one case interleaved (stats.interleave_rounds, as --compare
        does for revisions): each provider is warmed up (and its accuracy checked), then every
        round times each provider for about suite.round_s seconds, in turn. A row's median and
        interval pool its rounds; each peer's speedup against our fastest provider comes from the
        paired rounds (stats.paired_speedup_ci), so load that changes between rounds cancels.
        A provider whose first call takes once_over_s or more is timed once, outside the rounds
        (its comparison is then unpaired)."""
        res: Dict[Case, Result] = {}
        live = []  # (case, step, first call s, err, err_note, peak_mb, t0)
        has_ours = any(c.provider in OURS for c in group)
        # ours first: a peer is timed only when one of our providers was (else nothing to
        # compare with; `--provider sdpa` alone still times SDPA)
        for case in sorted(group, key=lambda c: c.provider not in OURS):
            if has_ours and case.provider not in OURS and not any(
                    c.provider in OURS for c, *_ in live):
                res[case] = self._result(case, status="skipped",
                                         note="no lightning_ops provider of this case was "
                                              "timed (nothing to compare with)")
                continue
            limit = min(self.max_case_s, self.remaining())
            why = self._skip_reason(case, limit)
            if why:
                res[case] = self._result(case, status="skipped", note=why)
                continue
            run = registry.provider_function(case.provider, OPS[case.op])
            spec, dtype = case.spec, DTYPES[case.dtype]
            err, err_note = float("nan"), ""
            t0 = time.monotonic()
            step = None
            try:
                with timing.time_limit(limit):
                    if self.acc is not None:  # also the one-time warm-up of this (op, provider)
                        err, err_note = self.acc(case, run)
                    else:
                        self._warm(case, run)
                    sets = timing.n_input_sets(spec.bytes(case.cfg, dtype, "fwd"), self.device)
                    step = timing.build_step(case, spec, run, self.device, sets)
                    with timing.CudaPeakMemory(self.device) as mem:
                        prev = torch.get_num_threads()
                        torch.set_num_threads(self.threads)
                        try:
                            t1 = time.perf_counter()
                            step(0)
                            timing._sync(self.device)
                            first = time.perf_counter() - t1
                        finally:
                            torch.set_num_threads(prev)
            except timing.CaseTimeout as e:
                self.history.setdefault(self._hkey(case), []).append((case.cfg.T, limit))
                res[case] = self._result(case, status="timeout", note=str(e), max_rel_err=err)
                continue
            except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
                res[case] = self._result(case, status="error", note=_short(e), max_rel_err=err)
                continue
            if first >= self.once_over_s:
                t = timing.Timing([first], mem.mb, f"timed once ({first:.1f} s per call), no "
                                                   f"warm-up", once=True)
                res[case] = self._ok_result(case, t, err, err_note, t0)
                step = None
                continue
            live.append((case, step, first, err, err_note, mem.mb, t0))
        if live:
            round_s = self.s.round_s
            per_round = sum(max(round_s, first) for _, _, first, *_ in live)
            rounds = self.rounds
            fit = int(max(self.remaining(), 0) * 0.8 // max(per_round, 1e-9))
            if fit < rounds:  # shrink to what the budget allows (an interval needs 2)
                rounds = max(2, fit)
            samplers = [timing.round_sampler(step, self.device, threads=self.threads,
                                             round_s=round_s, call_s=first)
                        for _, step, first, *_ in live]
            cpus = len(load.usable_cpus())
            t0 = time.monotonic()
            try:
                with load.Sampler() as ls, timing.time_limit(
                        max(self.max_case_s, 3 * per_round * rounds)):
                    per, order = stats.interleave_rounds(samplers, rounds)
            except timing.CaseTimeout as e:
                for case, *_ in live:
                    res[case] = self._result(case, status="timeout", note=str(e))
                return res
            except Exception as e:  # noqa: BLE001
                for case, *_ in live:
                    res[case] = self._result(case, status="error", note=_short(e))
                return res
            finally:
                samplers = None  # noqa: F841 - free the inputs and graphs
                live = [(c, None, *rest) for c, _, *rest in live]
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            noisy = load.is_noisy(ls.others, self.threads, cpus)
            pooled = [[x for r in rs for x in r] for rs in per]
            ours = [j for j, (c, *_) in enumerate(live) if c.provider in OURS]
            best = min(ours, key=lambda j: statistics.median(pooled[j]), default=None)
            for j, (case, _, first, err, err_note, peak, t_start) in enumerate(live):
                t = timing.Timing(pooled[j], peak, "", others=ls.others, noisy=noisy)
                extra = {"rounds": rounds}
                if best is not None and case.provider not in OURS:
                    sp = stats.paired_speedup_ci(per[best], per[j])
                    extra.update(speedup=sp.ratio, speedup_lo=sp.lo, speedup_hi=sp.hi,
                                 speedup_vs=live[best][0].provider)
                res[case] = self._ok_result(case, t, err, err_note, t_start, **extra)
        return res

    def run(self, cases: Sequence[Case]) -> List[Result]:
        out = []
        groups = self.groups(cases)
        for i, c in enumerate(cases):
            if c in groups:
                if c not in self.grouped:
                    self.grouped.update(self.run_group(groups[c]))
                r = self.grouped[c]
            else:
                r = self.run_case(c)
            out.append(r)
            if self.quiet:
                continue
            if r.status == "ok":
                what = (f"{report._num(r.median_ms)} ms"
                        + (f" [{report._num(r.ci_lo_ms)}-{report._num(r.ci_hi_ms)}]"
                           if r.reps > 1 else " (timed once)")
                        + f", {r.reps} samples"
                        + (f" in {r.rounds} interleaved rounds" if r.rounds else "")
                        + (", noisy" if r.noisy else ""))
                if not math.isnan(r.speedup):
                    what += (f"; {r.speedup_vs} vs {r.provider}: "
                             + stats.Speedup(r.speedup, r.speedup_lo, r.speedup_hi, 0, 0)
                             .text(r.speedup_vs, r.provider))
            else:
                what = f"{r.status}: {r.note}"
            log.info(f"[{i + 1}/{len(cases)}] {c.op} {c.provider} T{c.cfg.T} {c.mode} "
                     f"{c.dtype}: {what}  ({time.monotonic() - self.t0:.0f} s)")
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


def _error(msg: str) -> int:
    log.error(f"error: {msg}")
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    console = _setup_logging(args.quiet)
    handlers = [console]
    try:
        return _main(args, handlers)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def _main(args, handlers) -> int:
    t_start = time.monotonic()
    if args.report_from:
        return _report_only(args)
    name = "quick" if args.quick else ("gpu" if args.gpu_suite else "cpu")
    s = registry.suite(name)
    dev = args.device or ("cuda" if args.gpu_suite else s.device)
    if dev == "cuda" and not torch.cuda.is_available():
        return _error("a CUDA device was asked for (--gpu-suite / --device cuda) but torch "
                      "sees none")
    device = torch.device(dev)
    if device.type == "cuda" and name == "quick":
        s.dtype = "bf16"
    if args.list:
        list_all(device)
        return 0
    threads = args.threads or load.physical_cores()
    torch.set_num_threads(threads)
    ops = args.op or list(OPS)
    modes = args.mode or list(s.modes)
    Ts = args.T or list(s.Ts)
    dtypes = args.dtype or [s.dtype]
    # everything that can fail is checked before any timing
    errors = registry.asked_but_unavailable(ops, args.provider, device)
    if errors:
        for e in errors:
            log.error(f"error: {e}")
        log.error("(`python -m benchmarks --list` shows every op and provider)")
        return 2
    resolved = None
    if args.compare:
        from . import compare
        try:
            resolved = compare.resolve(args.compare)
        except compare.CompareError as e:
            return _error(str(e))
    info = env.run_info(device)
    if args.save and info["git_rev"].endswith("+dirty"):
        return _error("--save records curated results: commit (or stash) your changes first "
                      f"(the checkout is at {info['git_rev']})")
    if threads > len(load.usable_cpus()) and device.type == "cpu":
        log.warning(f"warning: --threads {threads} is more than the {len(load.usable_cpus())} "
                    f"CPUs this process may use")

    chk = load.check(threads)
    log.info(f"lightning_ops benchmarks: suite={s.name} device={info['device']} "
             f"torch={info['torch']} triton={info['triton']} rev={info['git_rev']} "
             f"threads={threads} date={info['date']}")
    log.info(f"load before the run: 1-min load average {chk.load1:.2f}, other processes use "
             f"{chk.others:.2f} of {chk.cpus} CPUs")
    if chk.warning():
        log.warning(chk.warning())

    if args.compare:
        from . import compare
        cases, _ = registry.plan(s, ops, args.provider or list(registry.OURS), modes,
                                 args.T or list(s.Ts[:2]), dtypes, device, extras=False)
        cases = [c for c in cases if c.provider != "sdpa" or args.provider]
        return compare.run(args.compare, cases, str(device), threads, args.rounds, log,
                           min_time_s=min(s.min_time_s, 0.1),
                           max_time_s=min(s.max_time_s, 0.5), root_and_sha=resolved)

    out = args.out or os.path.join(RUNS_DIR, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    handlers.append(_log_to_file(os.path.join(out, "bench.log")))
    info["load1"] = chk.load1
    log.info(f"config: B={s.base.B} H={s.base.H} K={s.base.K} V={s.base.V} T={Ts} "
             f"modes={modes} dtypes={dtypes}" + ("" if args.T or not s.extra else " + " +
             ", ".join(f"{op} {p} T={T}{' ' + '/'.join(ms) if ms else ''}"
                       for op, p, T, ms in s.extra)))
    if device.type == "cpu" and torch.cuda.is_available() and not args.device:
        log.info("(a CUDA device is present: `--gpu-suite` benchmarks it)")
    peaks = None
    if not args.no_roofline:
        peaks = roofline.measure_peaks(device, DTYPES[dtypes[0]], quick=s.name == "quick")
        log.info(f"device peaks (measured now, {threads} thread(s)): {peaks.what}")
    cases, notes = registry.plan(s, ops, args.provider, modes, Ts, dtypes, device,
                                 extras=args.T is None)
    for n in _group_notes(notes):
        log.info(f"note: {n}")
    acc = None if args.no_err else Accuracy(s.err_cfg, device)
    runner = Runner(s, device, info, peaks, acc, threads,
                    args.max_case_s or s.max_case_s, args.budget_s or s.budget_s, t0=t_start,
                    quiet=args.quiet, rounds=args.rounds)
    with load.Monitor() as runner.monitor:
        results = runner.run(cases)
    log.info(report.table(results, acc.header(dtypes) if acc else ""))
    log.info("")
    log.info("timing: median per call; ±: half-width of its 95% bootstrap interval; "
             "* timed once; ~ noisy; warm-up first, inputs rotated across repeats; "
             + ("triton.testing.do_bench (CUDA events)" if device.type == "cuda" else
                f"torch.utils.benchmark.Timer, {threads} thread(s)")
             + "; TFLOP/s, GB/s, % floor (of the measured copy bandwidth) and % comp (of the "
               "measured matmul peak) are for the main mode; formulas in "
               "benchmarks/registry.py"
             + ("; peak MB: allocator peak above the inputs" if device.type == "cuda" else ""))
    spt = report.speedup_table(results)
    if spt:
        log.info("")
        log.info(f"speedups: a peer's time / our fastest provider's, same op, shape and mode; "
                 f"both timed in {args.rounds} interleaved rounds (A B A B ...), the 95% "
                 f"interval from the paired rounds; 'no significant difference' when it "
                 f"covers 1x")
        for line in spt:
            log.info("  " + line)
        log.info("")
    lines = report.summary(results)
    if s.name == "cpu":
        lines += report.cpu_targets(results)
    log.info("summary (our fastest backend vs each peer, same op, shape and mode, timed in "
             "interleaved rounds; >1x = we are faster; [95% interval from the paired rounds]):"
             if lines else
             "summary: no peer measured alongside our ops")
    for line in lines:
        log.info("  " + line)
    hl = report.holes(results)
    log.info("not fully timed:" + ("" if hl else " none"))
    for line in hl:
        log.info("  " + line)
    oth = [r.others for r in results if r.status == "ok" and not math.isnan(r.others)]
    if oth:
        log.info(f"load during the run: other processes used {statistics.median(oth):.2f} "
                 f"cores (median over cases, max {max(oth):.2f}); {threads} thread(s) here, "
                 f"{len(load.usable_cpus())} CPUs")
    n = report.write_csv(os.path.join(out, "results.csv"), results)
    log.info(f"wrote {n} rows to {os.path.join(out, 'results.csv')}")
    paths: List[str] = []
    if not args.no_plots:
        paths, why = report.plot(results, os.path.join(out, "plots"))
        log.info(why or f"wrote {len(paths)} plots to {os.path.join(out, 'plots')}")
    if args.report:
        path = os.path.join(out, "report.md")
        with open(path, "w") as f:
            f.write(report.markdown(results, paths, out, _header(info, threads, chk), lines))
        log.info(f"wrote {path}")
    if args.save:
        n = report.write_csv(os.path.join(RESULTS_DIR, "results.csv"), results)
        for p in paths:
            os.makedirs(os.path.join(RESULTS_DIR, "plots"), exist_ok=True)
            shutil.copy(p, os.path.join(RESULTS_DIR, "plots", os.path.basename(p)))
        log.info(f"saved {n} rows to {os.path.join(RESULTS_DIR, 'results.csv')} and "
                 f"{len(paths)} plots to {os.path.join(RESULTS_DIR, 'plots')} (commit them)")
    log.info(f"done in {time.monotonic() - t_start:.0f} s")
    return 0


def _header(info: Dict, threads: int, chk) -> List[str]:
    return [f"device: {info['device']}", f"torch {info['torch']}, triton {info['triton']}",
            f"revision: {info['git_rev']}, date {info['date']}",
            f"threads: {threads}; load before the run: load average {chk.load1:.2f}, other "
            f"processes {chk.others:.2f} cores"]


def _report_only(args) -> int:
    if not os.path.exists(args.report_from):
        return _error(f"--report-from {args.report_from}: no such file")
    results = report.expand_sdpa(report.read_csv(args.report_from))
    if not results:
        return _error(f"{args.report_from} has no rows")
    out = args.out or os.path.dirname(os.path.abspath(args.report_from))
    os.makedirs(out, exist_ok=True)
    paths: List[str] = []
    if not args.no_plots:
        paths, why = report.plot(results, os.path.join(out, "plots"))
        if why:
            log.info(why)
    r0 = results[-1]
    hdr = [f"device: {r0.device}", f"torch {r0.torch}, triton {r0.triton}",
           f"revisions: {', '.join(sorted({r.git_rev for r in results}))}",
           f"rows: {len(results)} from {args.report_from}"]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(report.markdown(results, paths, out, hdr, report.summary(results)))
    log.info(f"wrote {path}")
    return 0
