"""Where a run happened: device, library versions, git revision of the measured code."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Dict, Optional

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: just say so
        return "none"


def git_revision(path: Optional[str] = None) -> str:
    """Short hash of the checkout holding `path` (default: lightning_ops), '+dirty' when tracked
    files differ from it; outside git (a copied tree) $GIT_REVISION or 'unknown'. Read-only git
    commands only."""
    fallback = os.environ.get("GIT_REVISION", "unknown")
    if path is None:
        try:
            import lightning_ops
            path = os.path.dirname(os.path.dirname(os.path.abspath(lightning_ops.__file__)))
        except Exception:  # noqa: BLE001
            path = os.getcwd()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, text=True,
                             capture_output=True, timeout=10)
        if rev.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=path, text=True, capture_output=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def run_info(device: torch.device) -> Dict[str, str]:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "git_rev": git_revision(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
