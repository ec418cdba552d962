"""Fixtures of the compat tests (helpers: compat_helpers.py)."""
import pytest

import lightning_ops.compat as lc
from compat_helpers import drop_peer_modules


@pytest.fixture
def clean_peers():
    """No patch and no peer module imported, before and after the test (for the tests that
    patch: `pytestmark = pytest.mark.usefixtures("clean_peers")`)."""
    lc.unpatch()
    drop_peer_modules()
    yield
    lc.unpatch()
    drop_peer_modules()
