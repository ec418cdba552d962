"""fla's import paths of the newer layers (fla.layers.HGRN2Attention, fla.layers.MomAttention and
their submodules fla.layers.hgrn2 / fla.layers.mom) resolve to lightning_ops.layers, without a
patch (lightning_ops.compat.fla.layers), in alias mode (no fla installed) and in replace mode
(a fake installed fla); names fla does not have for these families stay absent."""
import textwrap

import pytest
import torch

import lightning_ops.compat as lc
from lightning_ops.compat._layers import LAYERS
from compat_helpers import drop_peer_modules, peer_modules_loaded, skip_if_installed

pytestmark = pytest.mark.usefixtures("clean_peers")


def test_explicit_namespace_needs_no_patch():
    layers = pytest.importorskip("lightning_ops.layers")
    from lightning_ops.compat.fla.layers import HGRN2Attention, MomAttention
    from lightning_ops.compat.fla.layers.hgrn2 import HGRN2Attention as H2
    from lightning_ops.compat.fla.layers.mom import MomAttention as M2
    assert HGRN2Attention is H2 is layers.HGRN2Attention
    assert MomAttention is M2 is layers.MomAttention
    import lightning_ops.compat.fla.layers as mirror
    assert {"HGRN2Attention", "MomAttention"} <= set(dir(mirror))
    assert not peer_modules_loaded()


def test_alias_mode_serves_the_new_layers():
    skip_if_installed("fla")
    layers = pytest.importorskip("lightning_ops.layers")
    assert lc.patch_fla() == "alias"
    from fla.layers import HGRN2Attention, MomAttention
    from fla.layers.hgrn2 import HGRN2Attention as H2
    from fla.layers.mom import MomAttention as M2
    assert HGRN2Attention is H2 is layers.HGRN2Attention
    assert MomAttention is M2 is layers.MomAttention
    # fla's LinearAttention takes any feature map and fla has no LION: neither is served
    for name in ("LinearAttention", "LION", "HedgehogAttention"):
        assert name not in LAYERS
        with pytest.raises(ImportError):
            exec(f"from fla.layers import {name}", {})
    # fla's arguments construct and run the layer through the alias
    torch.manual_seed(0)
    m = HGRN2Attention(mode="chunk", hidden_size=32, expand_ratio=16, layer_idx=0)
    o, _, _ = m(torch.randn(2, 7, 32))
    assert o.shape == (2, 7, 32) and torch.isfinite(o).all()
    lc.unpatch()
    drop_peer_modules()
    with pytest.raises(ImportError):
        import fla.layers  # noqa: F401


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the fake fla has no fla.ops
def test_replace_mode_swaps_an_installed_flas_new_layers(tmp_path, monkeypatch):
    layers = pytest.importorskip("lightning_ops.layers")
    pkg = tmp_path / "fla"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers" / "__init__.py").write_text(
        "from .hgrn2 import HGRN2Attention\nfrom .mom import MomAttention\n")
    for mod, cls in (("hgrn2", "HGRN2Attention"), ("mom", "MomAttention")):
        (pkg / "layers" / f"{mod}.py").write_text(textwrap.dedent(f"""
            class {cls}:
                theirs = True
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fla.layers
    theirs = fla.layers.HGRN2Attention, fla.layers.MomAttention
    assert lc.patch_fla() == "replace"
    assert fla.layers.HGRN2Attention is layers.HGRN2Attention
    assert fla.layers.hgrn2.HGRN2Attention is layers.HGRN2Attention
    assert fla.layers.MomAttention is layers.MomAttention
    assert fla.layers.mom.MomAttention is layers.MomAttention
    lc.unpatch()
    assert (fla.layers.HGRN2Attention, fla.layers.MomAttention) == theirs
    assert lc.patch_fla(layers=False) == "replace"  # layers=False keeps theirs
    assert (fla.layers.HGRN2Attention, fla.layers.MomAttention) == theirs
