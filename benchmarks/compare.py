"""`--compare REV`: is the current code faster than revision REV, and by how much, with what
confidence?

1. REV is validated first (`git rev-parse --verify REV^{commit}`): a bad revision is an error
   before anything is timed.
2. REV is checked out with `git worktree add --detach` into a temporary folder (removed
   afterwards; the repository's own checkout is untouched).
3. Two worker processes run THIS harness (a copy of the benchmarks package), one importing the
   current lightning_ops, one REV's, both with the same --threads. Each case is then timed
   A, B, A, B, ... (`--rounds` rounds), each round several calls (Timer.adaptive_autorange), so a
   change of load during the run hits both sides alike.
4. speedup = time at REV / time now (>1: the current code is faster), from the paired rounds
   (stats.paired_speedup_ci: the geometric mean of each round's ratio), with its 95 % bootstrap
   interval; "no significant difference" when the interval covers 1. The main run times the
   providers of one case the same way (stats.interleave_rounds, in one process).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import stats
from ._worker import REPLY
from .registry import Case


class CompareError(Exception):
    """A revision or a side of the comparison cannot run: reported, exit status 2."""


def repo_root() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, text=True,
                         capture_output=True)
    if out.returncode != 0:
        raise CompareError(f"--compare needs a git checkout ({out.stderr.strip()})")
    return out.stdout.strip()


def resolve(rev: str) -> Tuple[str, str]:
    """(repository root, full commit hash of rev) or CompareError."""
    root = repo_root()
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                         cwd=root, text=True, capture_output=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise CompareError(f"--compare {rev}: not a revision of this repository "
                           f"(try a commit hash, a branch, a tag or HEAD~N)")
    return root, out.stdout.strip()


class Side:
    """A worker process timing cases with one lightning_ops (on `lib_path`)."""

    def __init__(self, name: str, lib_path: str, harness_dir: str, threads: int):
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (lib_path, env.get("PYTHONPATH")) if x)
        env["OMP_NUM_THREADS"] = str(threads)
        # cwd=harness_dir: `python -m` puts it first on sys.path, so `benchmarks` is this
        # harness and `lightning_ops` comes from lib_path
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks._worker", "--serve"],
                                     cwd=harness_dir, env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1)

    def ask(self, job: Dict) -> Dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read()[-1500:]
                raise CompareError(f"the {self.name} worker died: {err.strip()}")
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@dataclass
class Row:
    case: Case
    speedup: Optional[stats.Speedup]
    ms_now: float = float("nan")
    ms_rev: float = float("nan")
    noisy: bool = False
    order: str = ""
    error: str = ""


def _job(case: Case, device: str, threads: int, min_time_s: float, max_time_s: float) -> Dict:
    return {"op": case.op, "provider": case.provider, "cfg": case.cfg.__dict__,
            "mode": case.mode, "dtype": case.dtype, "device": device, "threads": threads,
            "min_time_s": min_time_s, "max_time_s": max_time_s}


def interleaved(sides: Sequence[Side], case: Case, device: str, threads: int, rounds: int,
                min_time_s: float, max_time_s: float) -> Row:
    a, b = sides
    job = _job(case, device, threads, min_time_s, max_time_s)
    noisy = []

    def sample(side: Side):
        def go() -> List[float]:
            r = side.ask(job)
            if "error" in r:
                raise CompareError(f"{side.name}: {r['error']}")
            noisy.append(bool(r.get("noisy")))
            return r["times"]
        return go

    try:
        sample(a)()  # warm-up round on each side (first-call costs), not counted
        sample(b)()
        noisy.clear()
        (ra, rb), order = stats.interleave_rounds([sample(a), sample(b)], rounds)
    except CompareError as e:
        return Row(case, None, error=str(e))
    sp = stats.paired_speedup_ci(ra, rb)
    import statistics
    ta, tb = [x for r in ra for x in r], [x for r in rb for x in r]
    return Row(case, sp, 1e3 * statistics.median(ta), 1e3 * statistics.median(tb), any(noisy),
               order)


def run(rev: str, cases: Sequence[Case], device: str, threads: int, rounds: int, log,
        min_time_s: float = 0.1, max_time_s: float = 0.6, root_and_sha=None) -> int:
    """Interleaved A/B timing of `cases` now vs at `rev`. Returns the exit status."""
    root, sha = root_and_sha or resolve(rev)
    here = os.path.dirname(os.path.abspath(__file__))
    import lightning_ops
    lib_now = os.path.dirname(os.path.dirname(os.path.abspath(lightning_ops.__file__)))
    tmp = tempfile.mkdtemp(prefix="lightning-bench-")
    wt = os.path.join(tmp, "rev")
    sides: List[Side] = []
    try:
        add = subprocess.run(["git", "worktree", "add", "--detach", wt, sha], cwd=root,
                             text=True, capture_output=True)
        if add.returncode != 0:
            raise CompareError(f"could not check out {rev}: {add.stderr.strip()}")
        shim = os.path.join(tmp, "harness")
        shutil.copytree(here, os.path.join(shim, "benchmarks"),
                        ignore=shutil.ignore_patterns("results", "runs", "__pycache__"))
        sides = [Side("current", lib_now, shim, threads), Side(rev, wt, shim, threads)]
        # can both sides run every case? (before any timing)
        pairs = sorted({(c.op, c.provider) for c in cases})
        usable = set()
        for side in sides:
            got = side.ask({"check": [list(p) for p in pairs], "device": device})
            if "error" in got:
                raise CompareError(f"{side.name}: {got['error']}")
            for p, why in zip(pairs, got["missing"]):
                if why is None:
                    usable.add((side.name, p))
                else:
                    log.info(f"compare: {p[1]} {p[0]} cannot run at {side.name}: {why}")
        cases = [c for c in cases if all((s.name, (c.op, c.provider)) in usable for s in sides)]
        if not cases:
            raise CompareError("no case can run on both sides; nothing to compare")
        log.info(f"compare: current tree vs {rev} ({sha[:10]}), {len(cases)} cases, "
                 f"{rounds} rounds each, interleaved A B A B ..., {threads} thread(s) per side")
        rows = []
        for i, c in enumerate(cases):
            r = interleaved(sides, c, device, threads, rounds, min_time_s, max_time_s)
            rows.append(r)
            what = r.speedup.text("current", rev) if r.speedup else f"error: {r.error}"
            log.info(f"[{i + 1}/{len(cases)}] {c.op} {c.provider} T{c.cfg.T} {c.mode}: {what}"
                     + (" (noisy)" if r.noisy else ""))
    except CompareError as e:
        log.error(f"error: {e}")
        return 2
    finally:
        for s in sides:
            s.close()
        subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=root,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)
    for line in report_lines(rows, rev):
        log.info(line)
    return 0 if any(r.speedup for r in rows) else 1


def report_lines(rows: Sequence[Row], rev: str) -> List[str]:
    out = ["", f"== speedup of the current tree vs {rev} (time at {rev} / time now; >1x = the "
           f"current tree is faster; [95% interval])",
           f"{'op':26s} {'T':>6s} {'provider':11s} {'mode':8s} {'now ms':>9s} "
           f"{'rev ms':>9s}  speedup"]
    by_prov: Dict[str, List[stats.Speedup]] = {}
    for r in rows:
        c = r.case
        if r.speedup is None:
            out.append(f"{c.op:26s} {c.cfg.T:6d} {c.provider:11s} {c.mode:8s} not compared: "
                       f"{r.error}")
            continue
        by_prov.setdefault(c.provider, []).append(r.speedup)
        out.append(f"{c.op:26s} {c.cfg.T:6d} {c.provider:11s} {c.mode:8s} {r.ms_now:9.3g} "
                   f"{r.ms_rev:9.3g}  {r.speedup.text('current', rev)}"
                   + ("  noisy" if r.noisy else ""))
    for prov, sps in by_prov.items():
        g, lo, hi = stats.geomean_ci(sps)
        verdicts = [s.verdict for s in sps]
        out.append(f"compare summary {prov}: geometric mean {g:.3g}x [{lo:.3g}-{hi:.3g}]; "
                   f"faster in {verdicts.count('faster')}, slower in {verdicts.count('slower')}, "
                   f"no significant difference in "
                   f"{verdicts.count('no significant difference')} of {len(sps)} cases")
    return out
