"""patch_fla / patch_mamba_ssm / patch_causal_conv1d / unpatch: the peers' import paths resolve
to lightning_ops whether or not the peers are installed, and unpatch restores everything.
"Installed" is simulated by small fake packages on sys.path (the real ones need CUDA)."""
import textwrap

import pytest
import torch

import lightning_ops.compat as lc
from lightning_ops.compat import _fla, _mamba
from compat_helpers import PEERS, peer_modules_loaded, skip_if_installed

pytestmark = pytest.mark.usefixtures("clean_peers")


def test_explicit_namespaces_need_no_patch():
    from lightning_ops.compat.causal_conv1d import causal_conv1d_fn
    from lightning_ops.compat.fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from lightning_ops.compat.fla.ops.gla import chunk_gla
    from lightning_ops.compat.mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    from lightning_ops.compat.mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    assert chunk_gla is _fla.chunk_gla and chunk_gated_delta_rule is _fla.chunk_gated_delta_rule
    assert mamba_inner_fn is _mamba.mamba_inner_fn
    assert mamba_chunk_scan_combined is _mamba.mamba_chunk_scan_combined
    assert causal_conv1d_fn is _mamba.causal_conv1d_fn
    assert not peer_modules_loaded()


def test_alias_mode_serves_the_peer_import_paths():
    skip_if_installed()
    assert lc.patch_all(layers=True) == {p: "alias" for p in PEERS}
    assert lc.patch_fla() == "alias"                                   # idempotent
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from fla.ops import chunk_linear_attn
    from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.ops.gla.chunk import chunk_gla as chunk_gla2
    from fla.ops.lightning_attn import chunk_lightning_attn
    from fla.ops.simple_gla import chunk_simple_gla
    from mamba_ssm import mamba_inner_fn as mif, selective_scan_fn as ssf
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    for ours, got in [(_fla.chunk_gla, chunk_gla), (_fla.chunk_gla, chunk_gla2),
                      (_fla.fused_recurrent_gla, fused_recurrent_gla),
                      (_fla.chunk_linear_attn, chunk_linear_attn),
                      (_fla.chunk_simple_gla, chunk_simple_gla),
                      (_fla.chunk_lightning_attn, chunk_lightning_attn),
                      (_fla.chunk_delta_rule, chunk_delta_rule),
                      (_fla.fused_recurrent_delta_rule, fused_recurrent_delta_rule),
                      (_fla.chunk_gated_delta_rule, chunk_gated_delta_rule),
                      (_mamba.selective_scan_fn, selective_scan_fn), (_mamba.selective_scan_fn, ssf),
                      (_mamba.mamba_inner_fn, mamba_inner_fn), (_mamba.mamba_inner_fn, mif),
                      (_mamba.mamba_chunk_scan_combined, mamba_chunk_scan_combined),
                      (_mamba.selective_state_update, selective_state_update),
                      (_mamba.causal_conv1d_fn, causal_conv1d_fn),
                      (_mamba.causal_conv1d_update, causal_conv1d_update)]:
        assert got is ours
    # fla's documented example runs
    import torch.nn.functional as F
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, 6, 2, 8, dtype=torch.float64))
    o, ht = chunk_gla(q, k, v, g, initial_state=None, output_final_state=True)
    assert o.shape == (1, 6, 2, 8) and ht.shape == (1, 2, 8, 8)
    from fla.ops.kda import chunk_kda  # KDA is mirrored too
    assert chunk_kda is _fla.chunk_kda
    with pytest.raises(ModuleNotFoundError, match="fla.ops.rwkv7.*not installed"):
        import fla.ops.rwkv7  # noqa: F401
    with pytest.raises(ModuleNotFoundError, match="mamba_ssm.models"):
        import mamba_ssm.models  # noqa: F401
    lc.unpatch()
    assert lc.patched() == {}
    assert not peer_modules_loaded()
    with pytest.raises(ImportError):
        import fla  # noqa: F401


def test_alias_mode_layers_are_ours():
    skip_if_installed()
    layers = pytest.importorskip("lightning_ops.layers")
    lc.patch_fla()
    lc.patch_mamba_ssm()
    from fla.layers import DeltaNet, GatedDeltaNet, GatedLinearAttention, LightningAttention
    from fla.layers.gated_deltanet import GatedDeltaNet as GDN2
    from mamba_ssm import Mamba, Mamba2
    from mamba_ssm.modules.mamba2 import Mamba2 as M2
    from mamba_ssm.modules.mamba_simple import Mamba as M1
    assert GatedLinearAttention is layers.GatedLinearAttention
    assert DeltaNet is layers.DeltaNet and LightningAttention is layers.LightningAttention
    assert GatedDeltaNet is layers.GatedDeltaNet is GDN2
    from fla.layers.kda import KimiDeltaAttention
    assert KimiDeltaAttention is layers.KimiDeltaAttention
    assert Mamba is layers.Mamba is M1 and Mamba2 is layers.Mamba2 is M2


def _fake_fla(root, broken=False):
    """A tiny installed-looking fla: ops, a layer module that bound the op at import, a module
    we do not mirror."""
    pkg = root / "fla"
    (pkg / "ops" / "gla").mkdir(parents=True)
    (pkg / "ops" / "rwkv7").mkdir(parents=True)
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('no CUDA here')\n" if broken else "")
    (pkg / "ops" / "__init__.py").write_text(
        "from .gla import chunk_gla, fused_recurrent_gla\nfrom .rwkv7 import chunk_rwkv7\n")
    (pkg / "ops" / "gla" / "__init__.py").write_text(textwrap.dedent("""
        def chunk_gla(*a, **k):
            return "theirs"
        def fused_recurrent_gla(*a, **k):
            return "theirs"
        def fused_chunk_gla(*a, **k):
            return "theirs"
        """))
    (pkg / "ops" / "rwkv7" / "__init__.py").write_text(
        "def chunk_rwkv7(*a, **k):\n    return 'rwkv7'\n")
    (pkg / "layers" / "__init__.py").write_text("from .gla import GatedLinearAttention\n")
    (pkg / "layers" / "gla.py").write_text(textwrap.dedent("""
        from fla.ops.gla import chunk_gla
        class GatedLinearAttention:
            def op(self):
                return chunk_gla()
        """))
    (root / "user_mod.py").write_text("from fla.ops.gla import chunk_gla as my_gla\n")


def test_replace_mode_patches_installed_package_and_unpatch_restores(tmp_path, monkeypatch):
    _fake_fla(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fla.layers.gla
    import fla.ops.gla
    import user_mod
    theirs = fla.ops.gla.chunk_gla
    with pytest.warns(RuntimeWarning, match="could not be imported"):
        # fla.ops.simple_gla etc. do not exist in the fake: reported, not fatal
        assert lc.patch_fla(layers=False) == "replace"
    assert fla.ops.gla.chunk_gla is _fla.chunk_gla
    assert fla.ops.chunk_gla is _fla.chunk_gla
    assert fla.layers.gla.chunk_gla is _fla.chunk_gla               # bound at import: swept
    assert user_mod.my_gla is _fla.chunk_gla                        # user code too
    assert fla.ops.gla.fused_recurrent_gla is _fla.fused_recurrent_gla
    from fla.ops.rwkv7 import chunk_rwkv7                            # not ours: still theirs
    assert chunk_rwkv7() == "rwkv7"
    assert fla.layers.GatedLinearAttention.__module__ == "fla.layers.gla"   # layers=False
    lc.unpatch("fla")
    assert fla.ops.gla.chunk_gla is theirs and fla.layers.gla.chunk_gla is theirs
    assert user_mod.my_gla is theirs and fla.ops.chunk_gla is theirs
    assert fla.layers.GatedLinearAttention().op() == "theirs"


def test_replace_mode_layers(tmp_path, monkeypatch):
    layers = pytest.importorskip("lightning_ops.layers")
    _fake_fla(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fla.layers
    theirs = fla.layers.GatedLinearAttention
    with pytest.warns(RuntimeWarning):
        lc.patch_fla()
    assert fla.layers.GatedLinearAttention is layers.GatedLinearAttention
    assert fla.layers.gla.GatedLinearAttention is layers.GatedLinearAttention
    assert fla.layers.GatedDeltaNet is layers.GatedDeltaNet         # added, removed on unpatch
    lc.unpatch()
    assert fla.layers.GatedLinearAttention is theirs
    assert not hasattr(fla.layers, "GatedDeltaNet")


def test_installed_but_broken_falls_back_to_alias(tmp_path, monkeypatch):
    _fake_fla(tmp_path, broken=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="cannot be imported"):
        assert lc.patch_fla() == "alias"
    from fla.ops.gla import chunk_gla
    assert chunk_gla is _fla.chunk_gla
    lc.unpatch()
    with pytest.raises(ImportError, match="no CUDA"):
        import fla  # noqa: F401


def test_unpatch_rejects_unknown_peer():
    with pytest.raises(ValueError, match="peer"):
        lc.unpatch("flash_attn")
