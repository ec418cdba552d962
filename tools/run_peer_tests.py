"""Run a peer library's own op test files (fla, mamba-ssm, causal-conv1d) against lightning_ops'
drop-in (lightning_ops.compat.patch_<peer>()), with the peer itself NOT importable, on this
machine's device (CPU here: our torch backend).

  OMP_NUM_THREADS=1 .venv/bin/python tools/run_peer_tests.py --peer fla \\
      --git-dir /work/.mirror/fla-org+flash-linear-attention/repo [--max-tokens 2048]
  OMP_NUM_THREADS=1 .venv/bin/python tools/run_peer_tests.py --peer mamba_ssm \\
      --git-dir /work/.mirror/state-spaces+mamba/repo --max-tokens 1024
  OMP_NUM_THREADS=1 .venv/bin/python tools/run_peer_tests.py --peer causal_conv1d \\
      --git-dir /work/.mirror/Dao-AILab+causal-conv1d/repo --max-tokens 512
  ... --tests /path/to/<peer>/tests [--files a.py,b.py] [--timeout 900] [-k EXPR]

(tools/run_fla_tests.py is this runner with --peer fla.)

The peer's test files are `git archive`d from --git-dir/--rev (or copied from --tests) into a
temporary directory; nothing of the peer is copied into this repository, and the snapshot is
never edited.

What runs (SUITES below): fla's tests/ops/<op>.py of the families we serve; mamba-ssm's
tests/ops/test_selective_scan.py, tests/ops/triton/test_ssd.py, test_selective_state_update.py
and test_layernorm_gated.py; causal-conv1d's tests/test_causal_conv1d.py. The other mamba-ssm
files test what the drop-in does not serve (Mamba-3 kernels in triton / cute / tilelang, the
determinism of mamba-ssm's own kernels, generation with its models) and are listed as not run.

Device: mamba-ssm's and causal-conv1d's tests hard-code `device = "cuda"` (fla's take
fla.utils.device, which our mirror sets). Without CUDA (or with --device cpu), the temporary
copy of each file gets one textual rewrite, reported per file: every assignment
`device = "cuda"` / `device = 'cuda'` becomes `device = "cpu"`. Nothing else of the tests is
changed (their tolerances, shapes and references stay theirs).

How the peers are kept out (robust against peers installed in the same environment, e.g. by
`make peers`): each file runs in its own `python -m pytest` subprocess with this module loaded
as a pytest plugin (`-p run_peer_tests`). Its `pytest_load_initial_conftests` hook runs before
the peer's conftest.py is imported and
  1. puts a meta-path finder first on sys.meta_path that answers `fla`, `mamba_ssm`,
     `causal_conv1d` and their submodules with ModuleNotFoundError, so an installed copy is
     never found;
  2. calls lightning_ops.compat.patch_<peer>() for the suite's peers (mamba-ssm's suite also
     patches causal_conv1d, which mamba-ssm depends on), which then take their alias branch:
     our mirror modules serve the peers' import paths; the run aborts unless the mode is
     'alias'.
No pip uninstall, no PYTHONPATH surgery: the blocking lives only in the test subprocess.

--max-tokens deselects the parametrised cases whose token count exceeds it, to keep CPU time
bounded (reported as 'deselected'): cu_seqlens[-1] when given, else batch * length from the
parameters named B / batch / batch_size (1 when absent: mamba-ssm and causal-conv1d hard-code
their batch) and T / seqlen. --timeout bounds each file's wall time (the results reported
before a timeout are kept: the plugin appends each test's outcome to a JSON lines file as it
finishes).

Summary: per file passed / failed / errors / skipped / deselected, then the distinct failure
reasons (exception type and first line) with their counts and one example test id each.

Our own compat suite in the "no peers installed" state (as CI has it) on a machine where
`make peers` installed them:

  OMP_NUM_THREADS=1 .venv/bin/python tools/run_peer_tests.py --without-installed-peers -- \\
      -q -p no:cacheprovider tests/compat

runs pytest in-process with a finder that hides the peers' installed copies (those found in
site-packages) but not fake peer packages the tests themselves put on sys.path.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("fla", "mamba_ssm", "causal_conv1d")
PLUGIN = Path(__file__).stem


@dataclass(frozen=True)
class Suite:
    """One peer's test files: `files` are relative to tests/<subdir>; `patch` the peers
    patched (alias mode) in each test subprocess; `cuda_device` whether the files hard-code
    device "cuda" (rewritten to "cpu" without CUDA); `not_run` files left out, with why;
    `known` failure reasons that are not drop-in bugs (a regex searched in
    "<test function>: <reason>"), with their explanation, printed beside them in the summary
    (they still count as failures)."""
    subdir: str
    files: Tuple[str, ...]
    patch: Tuple[str, ...]
    cuda_device: bool
    not_run: Dict[str, str] = field(default_factory=dict)
    known: Dict[str, str] = field(default_factory=dict)


_MAMBA3 = "Mamba-3 kernels (not served by the drop-in)"
SUITES = {
    # fla renamed test_gated_delta.py to test_gdn.py; whichever exists at the revision is run
    "fla": Suite("ops", ("test_gla.py", "test_simple_gla.py", "test_linear_attn.py",
                         "test_lightning_attn.py", "test_delta.py", "test_gdn.py",
                         "test_gated_delta.py", "test_kda.py", "test_log_linear_attn.py"),
                 ("fla",), cuda_device=False, known={
                     r"is not served by lightning_ops\.compat":
                         "outside the drop-in: an fla-internal kernel or chunk step (its own "
                         "buffers and layouts) called directly",
                     r"No module named 'fla\.ops\.gated_delta_rule\.backends'":
                         "outside the drop-in: fla's kernel-backend registry (FlashQLA: the "
                         "flash_qla package on SM90+; the tests monkeypatch its internals)"}),
    "mamba_ssm": Suite("", ("ops/test_selective_scan.py", "ops/triton/test_ssd.py",
                            "ops/triton/test_selective_state_update.py",
                            "ops/triton/test_layernorm_gated.py"),
                       ("mamba_ssm", "causal_conv1d"), cuda_device=True, not_run={
                           "ops/triton/test_mamba3_siso.py": _MAMBA3,
                           "ops/cute/test_mamba3_mimo_step.py": _MAMBA3 + ", CUTLASS cute",
                           "ops/tilelang/test_mamba3_mimo.py": _MAMBA3 + ", tilelang",
                           "modules/test_mamba3_varlen.py": "the Mamba-3 layer (not served)",
                           "test_determinism.py": "determinism of mamba-ssm's own CUDA/Triton "
                                                  "kernels (atomics), CUDA only",
                           "benchmark_determinism_kernels.py": "a benchmark, not a test",
                           "test_generation.py": "mamba-ssm's models and generation utilities "
                                                 "(not served)"},
                       known={
                           r"No module named 'mamba_ssm\.ops\.triton\.ssd_(chunk_state|"
                           r"state_passing|chunk_scan)'":
                               "outside the drop-in: mamba-ssm's internal SSD kernels "
                               "(_chunk_cumsum_fwd, _chunk_state_fwd, chunk_state_varlen, ...) "
                               "called directly"}),
    "causal_conv1d": Suite("", ("test_causal_conv1d.py",), ("causal_conv1d",),
                           cuda_device=True, not_run={
                               "benchmark_determinism_kernels.py": "a benchmark, not a test"}),
}


# =============================================================================================
# the pytest plugin (runs inside each test subprocess)
# =============================================================================================
class _HideInstalledPeers(importlib.abc.MetaPathFinder):
    """Hides the peers' installed copies (site-packages / dist-packages) only."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in BLOCKED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        where = "" if spec is None else str(spec.origin or spec.submodule_search_locations)
        if "site-packages" in where or "dist-packages" in where:
            raise ModuleNotFoundError(f"No module named {fullname!r} (installed copy hidden by "
                                      f"tools/{PLUGIN}.py)", name=fullname)
        return None


class _BlockPeers(importlib.abc.MetaPathFinder):
    """Makes the installed peer packages invisible: import and find_spec of them fail."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by "
                                      f"tools/{PLUGIN}.py)", name=fullname)
        return None


def _install() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            raise RuntimeError(f"{name} was imported before the plugin could block it")
    sys.meta_path.insert(0, _BlockPeers())
    import lightning_ops.compat as lc
    for peer in (os.environ.get("LO_PEER_PATCH") or "fla").split(","):
        mode = getattr(lc, f"patch_{peer}")()
        if mode != "alias":
            raise RuntimeError(f"patch_{peer}() returned {mode!r}: {peer} is still importable")


def pytest_addoption(parser):
    parser.addoption("--lo-max-tokens", type=int, default=0,
                     help="deselect cases with more than this many tokens (0: no limit)")


def pytest_load_initial_conftests(early_config, parser, args):
    _install()


def _first_int(params: dict, names, default):
    for n in names:
        if isinstance(params.get(n), int):
            return params[n]
    return default


def _tokens(params: dict) -> int:
    cu = params.get("cu_seqlens")
    if isinstance(cu, (list, tuple)) and cu:
        return int(cu[-1])
    b = _first_int(params, ("B", "batch", "batch_size"), 1)
    t = _first_int(params, ("T", "seqlen"), None)
    return b * t if t is not None else 0


def pytest_collection_modifyitems(config, items):
    limit = config.getoption("--lo-max-tokens")
    if not limit:
        return
    keep, drop = [], []
    for item in items:
        cs = getattr(item, "callspec", None)
        (drop if cs is not None and _tokens(cs.params) > limit else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _reason(report) -> str:
    lr = report.longrepr
    if lr is None:
        return ""
    if isinstance(lr, tuple):                       # skips: (file, line, reason)
        return str(lr[2])
    crash = getattr(getattr(lr, "reprcrash", None), "message", None)
    text = crash if crash else str(lr)
    lines = text.strip().splitlines()
    if not crash:       # a collection error: its last "E   ..." line names what failed
        errs = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
        lines = errs[-1:] or lines
    return lines[0][:300] if lines else ""


def _append(rows) -> None:
    out = os.environ.get("LO_PEER_REPORT")
    if out:
        with open(out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when in ("setup", "teardown") and
                                 (report.failed or report.skipped)):
        outcome = report.outcome
        if report.when != "call" and report.failed:
            outcome = "error"
        _append([{"id": report.nodeid, "outcome": outcome, "when": report.when,
                  "reason": _reason(report), "duration": round(report.duration, 2)}])


def pytest_deselected(items):
    _append([{"id": item.nodeid, "outcome": "deselected"} for item in items])


def pytest_collectreport(report):
    if report.failed:
        _append([{"id": report.nodeid or "<collection>", "outcome": "error",
                  "when": "collect", "reason": _reason(report)}])


# =============================================================================================
# the driver
# =============================================================================================
_CUDA_DEVICE = re.compile(r"""(\bdevice\s*=\s*)(['"])cuda\2""")


def cpu_device_rewrite(text: str) -> Tuple[str, int]:
    """The one rewrite applied to a copied test file on a machine without CUDA:
    `device = "cuda"` (either quote) becomes `device = "cpu"`. Returns (text, count)."""
    return _CUDA_DEVICE.subn(lambda m: f'{m.group(1)}{m.group(2)}cpu{m.group(2)}', text)


def _checkout(git_dir: str, rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", git_dir, "archive", rev, "tests"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "tests"


def _run_file(path: Path, tests_root: Path, suite: Suite, args, report: Path) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tools"), str(REPO),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LO_PEER_REPORT"] = str(report)
    env["LO_PEER_PATCH"] = ",".join(suite.patch)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    # fla's tests skip GQA cases unless its backend dispatch (tilelang / FlashQLA routing) is
    # off; the drop-in has no such dispatch, our ops are what run, so the cases apply
    env.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", PLUGIN,
           f"--rootdir={tests_root.parent}", "--lo-max-tokens", str(args.max_tokens),
           "-W", "ignore::DeprecationWarning", str(path)]
    if args.k:
        cmd += ["-k", args.k]
    t0 = time.time()
    log = report.with_suffix(".log")
    with open(log, "w") as out:
        try:
            subprocess.run(cmd, cwd=str(tests_root.parent), env=env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _append_to(report, {"id": "<timeout>", "outcome": "timeout",
                                "reason": f"file killed after {args.timeout}s"})
    return time.time() - t0


def _append_to(report: Path, row: dict) -> None:
    with open(report, "a") as f:
        f.write(json.dumps(row) + "\n")


def _known(reason: str, known: Dict[str, str]) -> str:
    for pattern, why in known.items():
        if re.search(pattern, reason):
            return why
    return ""


def _summarise(name: str, report: Path, secs: float, verbose: bool,
               known: Dict[str, str] = None) -> dict:
    rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() \
        else []
    counts = Counter(r["outcome"] for r in rows)
    reasons: "OrderedDict[str, list]" = OrderedDict()
    for r in rows:
        if r["outcome"] in ("failed", "error", "timeout") or (verbose and
                                                              r["outcome"] == "skipped"):
            reasons.setdefault(f"[{r['outcome']}] {r.get('reason', '')}", []).append(r["id"])
    print(f"{name:28s} passed {counts['passed']:4d}  failed {counts['failed']:4d}  "
          f"errors {counts['error']:3d}  skipped {counts['skipped']:4d}  "
          f"deselected {counts['deselected']:4d}{'  TIMEOUT' if counts['timeout'] else ''}"
          f"  ({secs:.0f}s)")
    notes = {}
    for why, ids in reasons.items():
        func = ids[0].split("::")[-1].split("[")[0]
        note = _known(f"{func}: {why.split('] ', 1)[-1]}", known or {})
        if note:
            notes[why] = note
        print(f"    {len(ids):4d} x {why}\n           e.g. {ids[0].split('::')[-1]}"
              + (f"\n           known: {note}" if note else ""))
    return {"file": name, **{k: counts[k] for k in ("passed", "failed", "error", "skipped",
                                                     "deselected", "timeout")},
            "seconds": round(secs), "reasons": {k: len(v) for k, v in reasons.items()},
            "known": notes}


def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch here: the tests could not run on CUDA either
        return False


def main(argv=None, peer: str = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--without-installed-peers"]:
        import pytest
        sys.meta_path.insert(0, _HideInstalledPeers())
        rest = argv[1:]
        return pytest.main(rest[1:] if rest[:1] == ["--"] else rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", choices=sorted(SUITES), default=peer,
                   required=peer is None, help="whose test suite to run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tests", help="the peer's tests directory")
    src.add_argument("--git-dir", help="a git directory of the peer's repository")
    p.add_argument("--rev", default="HEAD", help="revision for --git-dir (default HEAD)")
    p.add_argument("--files", default=None,
                   help="comma-separated test files, relative to tests/ops for fla and to "
                        "tests/ otherwise (default: the suite's; missing ones are noted)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="deselect cases with more than this many tokens (B*T); 0: all")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu rewrites the hard-coded device 'cuda' of mamba-ssm's / "
                        "causal-conv1d's tests (auto: cpu unless CUDA is available)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per file")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS when unset")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--json", default=None, help="write the summary here as JSON")
    p.add_argument("--verbose", action="store_true", help="list skip reasons too")
    p.add_argument("--report-dir", default=None,
                   help="keep each file's JSON lines report and pytest log here")
    args = p.parse_args(argv)
    suite = SUITES[args.peer]
    to_cpu = suite.cuda_device and (args.device == "cpu" or
                                    (args.device == "auto" and not _cuda_available()))

    with tempfile.TemporaryDirectory(prefix=f"lo_{args.peer}_tests_") as tmp:
        tmp = Path(tmp)
        if args.tests:
            tests = Path(args.tests).resolve()
            if to_cpu:          # the rewrite happens in a copy, never in the given tree
                tests = Path(shutil.copytree(tests, tmp / "tests"))
        else:
            tests = _checkout(args.git_dir, args.rev, tmp)
        base = tests / suite.subdir if suite.subdir else tests
        summary = []
        print(f"{args.peer} tests: {tests}{'' if args.tests else f' ({args.rev})'}; "
              f"max tokens {args.max_tokens or 'unlimited'}; timeout {args.timeout}s/file"
              f"{'; device cuda -> cpu' if to_cpu else ''}")
        files = args.files.split(",") if args.files else list(suite.files)
        for name in [f for f in files if f]:
            path = base / name
            if not path.exists():
                print(f"{name:28s} (not at this revision)")
                continue
            if to_cpu:
                text, n = cpu_device_rewrite(path.read_text())
                path.write_text(text)
                print(f"{name:28s} device 'cuda' -> 'cpu' in {n} place(s)")
            rdir = Path(args.report_dir) if args.report_dir else tmp
            rdir.mkdir(parents=True, exist_ok=True)
            report = rdir / f"{name.replace('/', '__')}.jsonl"
            report.unlink(missing_ok=True)
            secs = _run_file(path, tests, suite, args, report)
            summary.append(_summarise(name, report, secs, args.verbose, suite.known))
        if not args.files:
            for name, why in suite.not_run.items():
                if (base / name).exists():
                    print(f"{name:28s} not run: {why}")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if all(s["failed"] == s["error"] == s["timeout"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
