"""Run fla's own op test files against lightning_ops' drop-in: tools/run_peer_tests.py with
--peer fla (the runner, its plugin and its options are there; this name keeps the documented
command lines working).

  OMP_NUM_THREADS=1 .venv/bin/python tools/run_fla_tests.py --tests /path/to/fla/tests
  .venv/bin/python tools/run_fla_tests.py --git-dir /work/.mirror/fla-org+flash-linear-attention/repo \\
      --rev HEAD [--files test_gla.py,test_kda.py] [--max-tokens 2048] [--timeout 900] [-k EXPR]
  OMP_NUM_THREADS=1 .venv/bin/python tools/run_fla_tests.py --without-installed-peers -- \\
      -q -p no:cacheprovider tests/compat
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_peer_tests  # noqa: E402

SUITE = run_peer_tests.SUITES["fla"]
DEFAULT_FILES = SUITE.files


def main(argv=None) -> int:
    return run_peer_tests.main(argv, peer="fla")


if __name__ == "__main__":
    sys.exit(main())
