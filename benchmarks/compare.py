"""`--compare REV`: the same cases with lightning_ops as it was at git revision REV.

REV is checked out with `git worktree add --detach` into a temporary folder (removed afterwards,
the repository's own checkout untouched). The child run uses THIS registry and harness (a copy
of the benchmarks package) with REV's lightning_ops first on PYTHONPATH, so both sides measure
exactly the same cases; only the library differs. Speedup = REV's time / current time (>1: the
current code is faster)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

from .report import Result, from_dicts


def child_argv(args) -> List[str]:
    """The flags that select the same cases (not output, compare or roofline ones)."""
    argv: List[str] = []
    if args.quick:
        argv.append("--quick")
    if args.gpu_suite:
        argv.append("--gpu-suite")
    for flag in ("op", "provider", "dtype", "T", "mode"):
        v = getattr(args, flag)
        if v:
            argv += [f"--{flag}", ",".join(str(x) for x in v)]
    for flag in ("device", "max_case_s", "budget_s"):
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    return argv + ["--no-roofline", "--no-err", "--no-csv", "--no-plots"]


def repo_root() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, text=True,
                         capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"--compare needs a git checkout: {out.stderr.strip()}")
    return out.stdout.strip()


def run_at(rev: str, argv: Sequence[str], log) -> List[Result]:
    root = repo_root()
    tmp = tempfile.mkdtemp(prefix="lightning-bench-")
    wt = os.path.join(tmp, "rev")
    try:
        add = subprocess.run(["git", "worktree", "add", "--detach", wt, rev], cwd=root,
                             text=True, capture_output=True)
        if add.returncode != 0:
            raise RuntimeError(f"git worktree add {rev} failed: {add.stderr.strip()}")
        shim = os.path.join(tmp, "shim")
        shutil.copytree(os.path.dirname(os.path.abspath(__file__)),
                        os.path.join(shim, "benchmarks"),
                        ignore=shutil.ignore_patterns("results", "__pycache__"))
        out = os.path.join(tmp, "rev.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (wt, env.get("PYTHONPATH")) if x)
        cmd = [sys.executable, "-m", "benchmarks", *argv, "--json-out", out]
        log(f"compare: running the same cases at {rev} ({' '.join(cmd[1:])})")
        # cwd=shim: `python -m` puts it first on sys.path, so `benchmarks` is this harness and
        # `lightning_ops` comes from the worktree on PYTHONPATH
        proc = subprocess.run(cmd, cwd=shim, env=env, text=True, capture_output=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"the run at {rev} failed:\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        with open(out) as f:
            return from_dicts(json.load(f))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=root,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)


def speedup_table(current: Sequence[Result], other: Sequence[Result], rev: str
                  ) -> Tuple[List[str], Dict[str, float]]:
    """Rows of (op, shape, provider, mode, ms now, ms at rev, speedup) and the geometric-mean
    speedup per provider."""
    theirs = {r.key(): r for r in other if r.status == "ok"}
    lines = [f"{'op':26s} {'T':>6s} {'provider':12s} {'mode':8s} {'now ms':>10s} "
             f"{rev[:10] + ' ms':>13s} {'speedup':>8s}"]
    logs: Dict[str, List[float]] = {}
    for r in current:
        o = theirs.get(r.key())
        if r.status != "ok" or o is None:
            continue
        x = o.median_ms / r.median_ms
        logs.setdefault(r.provider, []).append(math.log(x))
        lines.append(f"{r.op:26s} {r.T:6d} {r.provider:12s} {r.mode:8s} {r.median_ms:10.3g} "
                     f"{o.median_ms:13.3g} {x:7.2f}x")
    geo = {p: math.exp(sum(v) / len(v)) for p, v in logs.items()}
    return lines, geo


def run(args, current: Sequence[Result], log) -> None:
    try:
        other = run_at(args.compare, child_argv(args), log)
    except Exception as e:  # noqa: BLE001 - the current results are already out
        log(f"compare: {e}")
        return
    lines, geo = speedup_table(current, other, args.compare)
    log("")
    log(f"== speedup vs {args.compare} (its time / current time; >1x = current is faster)")
    for line in lines:
        log(line)
    log("compare summary: " + (", ".join(f"{p} {g:.2f}x (geomean)" for p, g in geo.items())
                               or "no case measured on both sides"))
