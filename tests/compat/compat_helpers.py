"""Helpers of the compat tests: the peer packages whose import paths lightning_ops.compat
serves, and a clean slate between tests (the `clean_peers` fixture is in conftest.py)."""
from __future__ import annotations

import importlib.util
import sys
from typing import List

import pytest

PEERS = ("fla", "mamba_ssm", "causal_conv1d")
# top-level modules the tests themselves put on sys.path (test_patch's fake user code)
TEST_MODULES = ("user_mod",)


def peer_modules_loaded() -> List[str]:
    """Names in sys.modules under a peer package."""
    return [n for n in sys.modules if n.split(".")[0] in PEERS]


def drop_peer_modules() -> None:
    """Forget every imported peer module (and the tests' fake user modules)."""
    for name in list(sys.modules):
        if name.split(".")[0] in PEERS + TEST_MODULES:
            del sys.modules[name]


def skip_if_installed(*peers: str) -> None:
    """Skip the test when one of `peers` (default: all) is really installed."""
    for p in peers or PEERS:
        try:
            if importlib.util.find_spec(p) is not None:
                pytest.skip(f"{p} is installed here")
        except ImportError:
            pass
