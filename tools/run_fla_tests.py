"""Run fla's own op test files against lightning_ops' drop-in (lightning_ops.compat.patch_fla),
with fla itself NOT importable, on this machine's device (CPU here: our torch backend).

  OMP_NUM_THREADS=1 .venv/bin/python tools/run_fla_tests.py --tests /path/to/fla/tests
  .venv/bin/python tools/run_fla_tests.py --git-dir /work/.mirror/fla-org+flash-linear-attention/repo \
      --rev HEAD [--files test_gla.py,test_kda.py] [--max-tokens 2048] [--timeout 900] [-k EXPR]

fla's test files are read where they are (or `git archive`d into a temporary directory for
--git-dir/--rev); nothing of fla is copied into this repository.

How fla is kept out (robust against an fla installed in the same environment, e.g. by
`make peers`): each file runs in its own `python -m pytest` subprocess with this module loaded
as a pytest plugin (`-p run_fla_tests`). Its `pytest_load_initial_conftests` hook runs before
fla's tests/conftest.py is imported and
  1. puts a meta-path finder first on sys.meta_path that answers `fla`, `fla.*` (and the other
     peers, mamba_ssm / causal_conv1d, which fla's tests import optionally) with
     ModuleNotFoundError, so an installed copy is never found;
  2. calls lightning_ops.compat.patch_fla(), which then takes its alias branch (fla "not
     installed"): our mirror modules serve fla's import paths; the run aborts unless the mode
     is 'alias'.
No pip uninstall, no PYTHONPATH surgery: the blocking lives only in the test subprocess.

--max-tokens deselects the parametrised cases whose B*T (or cu_seqlens[-1]) exceeds it, to
keep CPU time bounded (reported as 'deselected'); --timeout bounds each file's wall time (the
results reported before a timeout are kept: the plugin appends each test's outcome to a JSON
lines file as it finishes).

Summary: per file passed / failed / errors / skipped / deselected, then the distinct failure
reasons (exception type and first line) with their counts and one example test id each.

Our own compat suite in the "no peers installed" state (as CI has it) on a machine where
`make peers` installed them:

  OMP_NUM_THREADS=1 .venv/bin/python tools/run_fla_tests.py --without-installed-peers -- \
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
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("fla", "mamba_ssm", "causal_conv1d")
# the op test files of the families lightning_ops serves (fla renamed test_gated_delta.py to
# test_gdn.py; whichever exists at the revision is run)
DEFAULT_FILES = ("test_gla.py", "test_simple_gla.py", "test_linear_attn.py",
                 "test_lightning_attn.py", "test_delta.py", "test_gdn.py",
                 "test_gated_delta.py", "test_kda.py", "test_log_linear_attn.py")


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
                                      f"tools/run_fla_tests.py)", name=fullname)
        return None


class _BlockPeers(importlib.abc.MetaPathFinder):
    """Makes the installed peer packages invisible: import and find_spec of them fail."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by "
                                      f"tools/run_fla_tests.py)", name=fullname)
        return None


def _install() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            raise RuntimeError(f"{name} was imported before the plugin could block it")
    sys.meta_path.insert(0, _BlockPeers())
    import lightning_ops.compat as lc
    mode = lc.patch_fla()
    if mode != "alias":
        raise RuntimeError(f"patch_fla() returned {mode!r}: fla is still importable")


def pytest_addoption(parser):
    parser.addoption("--lo-max-tokens", type=int, default=0,
                     help="deselect cases with more than this many tokens (0: no limit)")


def pytest_load_initial_conftests(early_config, parser, args):
    _install()


def _tokens(params: dict) -> int:
    cu = params.get("cu_seqlens")
    if isinstance(cu, (list, tuple)) and cu:
        return int(cu[-1])
    b, t = params.get("B", 1), params.get("T")
    if isinstance(t, int) and isinstance(b, int):
        return b * t
    return 0


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
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def pytest_runtest_logreport(report):
    out = os.environ.get("LO_FLA_REPORT")
    if not out:
        return
    if report.when == "call" or (report.when in ("setup", "teardown") and
                                 (report.failed or report.skipped)):
        outcome = report.outcome
        if report.when != "call" and report.failed:
            outcome = "error"
        with open(out, "a") as f:
            f.write(json.dumps({"id": report.nodeid, "outcome": outcome, "when": report.when,
                                "reason": _reason(report),
                                "duration": round(report.duration, 2)}) + "\n")


def pytest_deselected(items):
    out = os.environ.get("LO_FLA_REPORT")
    if out:
        with open(out, "a") as f:
            for item in items:
                f.write(json.dumps({"id": item.nodeid, "outcome": "deselected"}) + "\n")


def pytest_collectreport(report):
    out = os.environ.get("LO_FLA_REPORT")
    if out and report.failed:
        with open(out, "a") as f:
            f.write(json.dumps({"id": report.nodeid or "<collection>", "outcome": "error",
                                "when": "collect", "reason": _reason(report)}) + "\n")


# =============================================================================================
# the driver
# =============================================================================================
def _checkout(git_dir: str, rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", git_dir, "archive", rev, "tests"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "tests"


def _run_file(path: Path, tests_root: Path, args, report: Path) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tools"), str(REPO),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LO_FLA_REPORT"] = str(report)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    # fla's tests skip GQA cases unless its backend dispatch (tilelang / FlashQLA routing) is
    # off; the drop-in has no such dispatch, our ops are what run, so the cases apply
    env.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
           "run_fla_tests", f"--rootdir={tests_root.parent}", "--lo-max-tokens",
           str(args.max_tokens), "-W", "ignore::DeprecationWarning", str(path)]
    if args.k:
        cmd += ["-k", args.k]
    t0 = time.time()
    log = report.with_suffix(".log")
    with open(log, "w") as out:
        try:
            subprocess.run(cmd, cwd=str(tests_root.parent), env=env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            with open(report, "a") as f:
                f.write(json.dumps({"id": "<timeout>", "outcome": "timeout",
                                    "reason": f"file killed after {args.timeout}s"}) + "\n")
    return time.time() - t0


def _summarise(name: str, report: Path, secs: float, verbose: bool) -> dict:
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
    for why, ids in reasons.items():
        print(f"    {len(ids):4d} x {why}\n           e.g. {ids[0].split('::')[-1]}")
    return {"file": name, **{k: counts[k] for k in ("passed", "failed", "error", "skipped",
                                                     "deselected", "timeout")},
            "seconds": round(secs), "reasons": {k: len(v) for k, v in reasons.items()}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--without-installed-peers"]:
        import pytest
        sys.meta_path.insert(0, _HideInstalledPeers())
        rest = argv[1:]
        return pytest.main(rest[1:] if rest[:1] == ["--"] else rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tests", help="fla's tests directory (the one holding ops/)")
    src.add_argument("--git-dir", help="a git directory of fla's repository")
    p.add_argument("--rev", default="HEAD", help="revision for --git-dir (default HEAD)")
    p.add_argument("--files", default=",".join(DEFAULT_FILES),
                   help="comma-separated test files under tests/ops (missing ones are noted)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="deselect cases with more than this many tokens (B*T); 0: all")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per file")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS when unset")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--json", default=None, help="write the summary here as JSON")
    p.add_argument("--verbose", action="store_true", help="list skip reasons too")
    p.add_argument("--report-dir", default=None,
                   help="keep each file's JSON lines report and pytest log here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lo_fla_tests_") as tmp:
        tmp = Path(tmp)
        tests = Path(args.tests).resolve() if args.tests else _checkout(args.git_dir, args.rev,
                                                                         tmp)
        ops = tests / "ops"
        summary = []
        print(f"fla tests: {tests}{'' if args.tests else f' ({args.rev})'}; "
              f"max tokens {args.max_tokens or 'unlimited'}; timeout {args.timeout}s/file")
        for name in [f for f in args.files.split(",") if f]:
            path = ops / name
            if not path.exists():
                print(f"{name:28s} (not at this revision)")
                continue
            rdir = Path(args.report_dir) if args.report_dir else tmp
            rdir.mkdir(parents=True, exist_ok=True)
            report = rdir / f"{name}.jsonl"
            report.unlink(missing_ok=True)
            secs = _run_file(path, tests, args, report)
            summary.append(_summarise(name, report, secs, args.verbose))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if all(s["failed"] == s["error"] == s["timeout"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
