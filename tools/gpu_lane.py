"""One command for a GPU lease: `make gpu-lane OUT=<dir>` (= python3 tools/gpu_lane.py --out DIR).

Runs with the device's own python3 (no venv, no network), in this order, each step with a time
limit so the whole lane stays under 8 minutes on an H100:
  1. nvidia-smi, python / torch / triton / CUDA versions, git revision           (env.txt)
  2. carried wheels (.gpu-wheels/*.whl, made by `make gpu-wheels`: fla-core and
     flash-linear-attention 0.6.0, pure Python) installed with --no-index into a temp dir
  3. pytest -m gpu (parity of every op in bf16/fp16 against the fp32/fp64 reference, ...)
                                                                       (gpu-tests.log, .xml)
  4. tools/gpu_suite.py: production shapes vs fla / SDPA, % of HBM floor, decode latency
                                                                       (gpu_bench.csv, .png)
  5. everything in OUT (at most 8 files): lane.log, env.txt, gpu-tests.log, gpu-tests.xml,
     gpu_bench.csv, gpu_bench.png, sm90_resources.csv (the committed AOT table, for reference)
Exit status: non-zero when a GPU test or a parity check failed (or a step crashed).

--dry-run: the same script on a CPU (TRITON_INTERPRET=1, tiny shapes, steps needing CUDA
skipped), run by the CPU suite (tests/gpu/test_gpu_lane_dry_run.py).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".gpu-wheels")


class Lane:
    def __init__(self, out: str, dry: bool):
        self.out, self.dry = out, dry
        os.makedirs(out, exist_ok=True)
        self.log_f = open(os.path.join(out, "lane.log"), "a")
        self.status = 0
        self.t0 = time.time()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            x for x in (ROOT, self.env.get("PYTHONPATH")) if x)
        self.env["PYTHONUNBUFFERED"] = "1"
        if dry:
            self.env["TRITON_INTERPRET"] = "1"
            self.env.setdefault("OMP_NUM_THREADS", "1")

    def log(self, *msg):
        line = " ".join(str(m) for m in msg)
        stamp = f"[{time.time() - self.t0:6.1f}s]"
        print(stamp, line, flush=True)
        self.log_f.write(f"{stamp} {line}\n")
        self.log_f.flush()

    def sh(self, cmd, timeout: float, out_file: str = None, check=True) -> int:
        """Run cmd (list), tee its output to the log (and out_file); rc (124 on timeout)."""
        self.log("$", " ".join(cmd))
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=self.env, timeout=timeout, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            rc, text = r.returncode, r.stdout
        except subprocess.TimeoutExpired as e:
            rc = 124
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += f"\n[timed out after {timeout:.0f} s]\n"
        except FileNotFoundError as e:
            rc, text = 127, str(e)
        if out_file:
            with open(os.path.join(self.out, out_file), "a") as f:
                f.write(text)
        tail = text[-6000:]
        print(tail, flush=True)
        self.log_f.write(text + "\n")
        self.log(f"-> exit {rc}")
        if check and rc != 0:
            self.status = 1
        return rc


def versions(lane: Lane) -> None:
    lines = []
    if shutil.which("nvidia-smi"):
        lane.sh(["nvidia-smi"], 30, "env.txt", check=False)
    else:
        lines.append("nvidia-smi: not found")
    code = ("import sys, platform; print('python', sys.version.split()[0], platform.machine())\n"
            "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,"
            " 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)\n"
            "import triton; print('triton', triton.__version__)\n"
            "import numpy; print('numpy', numpy.__version__)\n"
            "for m in ('fla', 'mamba_ssm', 'causal_conv1d', 'transformers'):\n"
            "    try:\n"
            "        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))\n"
            "    except Exception as e: print(m, 'absent', type(e).__name__)\n")
    lane.sh([sys.executable, "-c", code], 120, "env.txt", check=False)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        lines.append(f"revision {rev or '?'}{' (modified)' if dirty else ''}")
    except FileNotFoundError:
        lines.append("revision ? (no git)")
    if shutil.which("nvcc"):
        lane.sh(["nvcc", "--version"], 30, "env.txt", check=False)
    with open(os.path.join(lane.out, "env.txt"), "a") as f:
        f.write("\n".join(lines) + "\n")
    lane.log(*lines)


def install_wheels(lane: Lane) -> None:
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    if not wheels:
        lane.log(f"no carried wheels in {os.path.relpath(WHEELS, ROOT)} (make gpu-wheels): "
                 "fla is compared only if the device has it")
        return
    target = os.path.join("/tmp", "lightning-ops-lane-site")
    rc = lane.sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                  "--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *wheels],
                 180, check=False)
    if rc == 0:
        lane.env["PYTHONPATH"] = os.pathsep.join([lane.env["PYTHONPATH"], target])
        lane.log("wheels installed:", ", ".join(os.path.basename(w) for w in wheels))
    else:
        lane.log("carried wheels failed to install: peers that need them are skipped")


def gpu_tests(lane: Lane, timeout: float, path: str) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
           "-rfEs", f"--junitxml={os.path.join(lane.out, 'gpu-tests.xml')}", path]
    if lane.dry:  # every GPU test skips without CUDA: collection and markers are what's proven
        cmd += ["-x"]
    rc = lane.sh(cmd, timeout, "gpu-tests.log", check=False)
    if rc not in (0, 5):  # 5: nothing collected (not a failure of the lane itself)
        lane.status = 1
        lane.log("GPU tests FAILED (see gpu-tests.log)")


def suite(lane: Lane, timeout: float) -> None:
    csv_path = os.path.join(lane.out, "gpu_bench.csv")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "gpu_suite.py"), "--out", csv_path,
           "--budget-s", str(max(30.0, timeout - 30.0))]
    if lane.dry:
        cmd.append("--dry-run")
    rc = lane.sh(cmd, timeout, check=False)
    if rc != 0:
        lane.status = 1
        lane.log("benchmark suite FAILED (parity failure or crash; see lane.log)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU: interpreter, tiny shapes")
    p.add_argument("--tests-timeout", type=float, default=200.0)
    p.add_argument("--suite-timeout", type=float, default=210.0)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--tests-path", default="tests", help="where pytest -m gpu collects")
    a = p.parse_args(argv)
    lane = Lane(a.out, a.dry_run)
    lane.log(f"gpu lane {'(dry run) ' if a.dry_run else ''}-> {a.out}")
    if not a.dry_run:
        import torch
        if not torch.cuda.is_available():
            lane.log("no CUDA device visible: use --dry-run on a CPU")
            return 2
    versions(lane)
    install_wheels(lane)
    if not a.skip_tests:
        gpu_tests(lane, a.tests_timeout, a.tests_path)
    suite(lane, a.suite_timeout)
    table = os.path.join(ROOT, "benchmarks", "results", "sm90_resources.csv")
    if os.path.exists(table):
        shutil.copy(table, os.path.join(a.out, "sm90_resources.csv"))
    files = sorted(os.listdir(a.out))
    lane.log(f"done in {time.time() - lane.t0:.0f} s, status {lane.status}; "
             f"{len(files)} files in {a.out}: {', '.join(files)}")
    return lane.status


if __name__ == "__main__":
    sys.exit(main())
