"""mamba_ssm.ops.triton.layernorm_gated served by lightning_ops.compat (mamba-ssm not installed):
layernorm_fn / rmsnorm_fn / rms_norm_ref and the LayerNorm / RMSNorm modules, against the math
written out here in float64 (outputs and the gradients of x, weight, bias and z), the modules'
parameters and state_dict keys, and the import path after patch_mamba_ssm() in alias mode."""
from __future__ import annotations

import itertools

import pytest
import torch

import lightning_ops.compat as lc
from compat_helpers import skip_if_installed
from lightning_ops.compat.mamba_ssm.ops.triton import layernorm_gated as lg

EPS = 1e-5
D = 128


def math_fp64(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm):
    """The definition, one group at a time, in float64: (gate) -> mean / variance -> scale ->
    weight, bias -> (gate), the gate being z * sigmoid(z)."""
    x = x.double()
    gate = None if z is None else z.double() * torch.sigmoid(z.double())
    if gate is not None and not norm_before_gate:
        x = x * gate
    n = x.shape[-1]
    gs = n if group_size is None else group_size
    cols = []
    for start in range(0, n, gs):
        xg = x[..., start:start + gs]
        centre = 0.0 if is_rms_norm else xg.sum(-1, keepdim=True) / gs
        dev = xg - centre
        var = (dev * dev).sum(-1, keepdim=True) / gs
        cols.append(dev / (var + eps).sqrt())
    y = torch.cat(cols, -1) * weight.double()
    if bias is not None:
        y = y + bias.double()
    if gate is not None and norm_before_gate:
        y = y * gate
    return y


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# relative error norms: float32 ~1e-7 measured; bf16 is its rounding of the result (~2.6e-3
# measured for outputs and gradients, unit roundoff 2**-9)
TOL = {torch.float32: 1e-6, torch.bfloat16: 6e-3}
CASES = list(itertools.product([False, True], [False, True], [False, True], [None, 64],
                               [True, False], [torch.float32, torch.bfloat16]))


def _inputs(dtype, has_bias, has_z, wdtype=None, shape=(2, 7, D), seed=0):
    gen = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype

    def r(*s, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=gen) * scale + shift).to(dt).requires_grad_()

    x = r(*shape, shift=0.5)              # a non-zero mean: LayerNorm and RMSNorm differ
    z = r(*shape) if has_z else None
    w = r(shape[-1], dt=wdtype, scale=0.5, shift=1.0)
    b = r(shape[-1], dt=wdtype) if has_bias else None
    return x, w, b, z


@pytest.mark.parametrize("has_bias,has_z,is_rms_norm,group_size,norm_before_gate,dtype", CASES,
                         ids=[f"bias{int(a)}-z{int(b)}-{'rms' if c else 'ln'}-g{d}-"
                              f"{'nbg' if e else 'gbn'}-{str(f)[6:]}"
                              for a, b, c, d, e, f in CASES])
def test_layernorm_fn_against_the_math(has_bias, has_z, is_rms_norm, group_size,
                                       norm_before_gate, dtype):
    x, w, b, z = _inputs(dtype, has_bias, has_z)
    y = lg.layernorm_fn(x, w, b, z=z, eps=EPS, group_size=group_size,
                        norm_before_gate=norm_before_gate, is_rms_norm=is_rms_norm)
    assert y.dtype == dtype and y.shape == x.shape
    leaves = [t for t in (x, w, b, z) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    xr, wr, br, zr = (next(it) if t is not None else None for t in (x, w, b, z))
    ref = math_fp64(xr, wr, br, zr, EPS, group_size, norm_before_gate, is_rms_norm)
    tol = TOL[dtype]
    assert rel_err(y, ref) <= tol
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    for t, g, gr in zip(leaves, grads, ref_grads):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert rel_err(g, gr) <= tol, (t.shape, rel_err(g, gr))


def test_rmsnorm_fn_is_layernorm_fn_with_rms():
    x, w, b, z = _inputs(torch.float32, True, True)
    for nbg in (True, False):
        torch.testing.assert_close(
            lg.rmsnorm_fn(x, w, b, z, EPS, 64, nbg),
            lg.layernorm_fn(x, w, b, z, EPS, 64, nbg, True), rtol=0, atol=0)


def test_float64_inputs_compute_in_float64():
    x, w, b, z = _inputs(torch.float64, True, True)
    for rms, nbg, gs in itertools.product((False, True), (False, True), (None, 32)):
        y = lg.layernorm_fn(x, w, b, z, EPS, gs, nbg, rms)
        assert y.dtype == torch.float64
        assert rel_err(y, math_fp64(x, w, b, z, EPS, gs, nbg, rms)) <= 1e-13


def test_bf16_inputs_with_fp32_weights_as_mamba_ssms_test():
    """mamba-ssm's test: 16-bit x and z, float32 weight and bias; the output in x's dtype,
    each gradient in its tensor's dtype; the statistics, weight and gate applied in float32."""
    x, w, b, z = _inputs(torch.bfloat16, True, True, wdtype=torch.float32)
    y = lg.layernorm_fn(x, w, b, z, EPS, 64, False, True)
    assert y.dtype == torch.bfloat16
    # the float32 computation of the same bf16 inputs, rounded once at the end
    y32 = lg.layernorm_fn(x.float(), w, b, z.float(), EPS, 64, False, True)
    assert torch.equal(y, y32.to(torch.bfloat16))
    y.sum().backward()
    assert (x.grad.dtype, z.grad.dtype, w.grad.dtype, b.grad.dtype) == (
        torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)


def test_rms_norm_ref():
    x, w, b, z = _inputs(torch.float32, True, True)
    for nbg, gs in itertools.product((True, False), (None, 64)):
        want = math_fp64(x, w, b, z, EPS, gs, nbg, True)
        got = lg.rms_norm_ref(x, w, b, z=z, eps=EPS, group_size=gs, norm_before_gate=nbg)
        assert got.dtype == torch.float32 and rel_err(got, want) <= 2e-6
    xd, wd, bd, zd = (t.detach().double() for t in (x, w, b, z))
    assert rel_err(lg.rms_norm_ref(xd, wd, bd, zd, EPS, 64), math_fp64(xd, wd, bd, zd, EPS, 64,
                                                                          True, True)) <= 1e-13
    # upcast=False keeps x and z in their dtype (the 16-bit baseline of mamba-ssm's test): less
    # accurate than the upcast result, in the input's dtype, and it still differentiates
    xh, zh = x.detach().half().requires_grad_(), z.detach().half()
    want = math_fp64(xh, w, b, zh, EPS, 64, False, True)
    up = lg.rms_norm_ref(xh, w, b, zh, EPS, 64, False, upcast=True)
    low = lg.rms_norm_ref(xh, w, b, zh, EPS, 64, False, upcast=False)
    assert up.dtype == low.dtype == torch.float16
    assert rel_err(up, want) <= 1e-3 and rel_err(low, want) <= 1e-2
    low.sum().backward()
    assert xh.grad.dtype == torch.float16 and torch.isfinite(xh.grad).all()


def test_layer_norm_without_gate_is_torchs_layer_and_group_norm():
    x, w, b, _ = _inputs(torch.float32, True, False)
    torch.testing.assert_close(lg.layernorm_fn(x, w, b, eps=EPS),
                               torch.nn.functional.layer_norm(x, (D,), w, b, EPS))
    gs = 32                         # group_norm of [rows, D] with D // gs groups
    gn = torch.nn.functional.group_norm(x.reshape(-1, D), D // gs, eps=EPS).reshape(x.shape)
    torch.testing.assert_close(lg.layernorm_fn(x, torch.ones(D), None, eps=EPS, group_size=gs),
                               gn)


def test_bad_inputs_raise_naming_the_tensor():
    x, w, b, z = _inputs(torch.float32, True, True)
    with pytest.raises(ValueError, match="weight"):
        lg.layernorm_fn(x, w[:-1], b)
    with pytest.raises(ValueError, match="bias"):
        lg.layernorm_fn(x, w, b[:-1])
    with pytest.raises(ValueError, match="gate z"):
        lg.layernorm_fn(x, w, b, z[:, :-1])
    with pytest.raises(ValueError, match="group_size"):
        lg.layernorm_fn(x, w, b, group_size=48)
    with pytest.raises(TypeError, match="norm_before_gate"):
        lg.layernorm_fn(x, w, b, z, norm_before_gate=None)
    with pytest.raises(ValueError, match="group_size"):
        lg.RMSNorm(D, group_size=48)


def test_odd_layouts_and_empty_inputs():
    _, w, b, _ = _inputs(torch.float32, True, True)
    xt, zt = torch.randn(3, D, 5).transpose(1, 2), torch.randn(3, D, 5).transpose(1, 2)
    assert not xt.is_contiguous()                        # [3, 5, D], last-dim stride 5
    y = lg.rmsnorm_fn(xt, w, b, zt, EPS, 64)
    torch.testing.assert_close(y, lg.rmsnorm_fn(xt.contiguous(), w, b, zt.contiguous(), EPS,
                                                64))
    e = torch.empty(0, 4, D)
    assert lg.layernorm_fn(e, w, b, torch.empty(0, 4, D), EPS, 64).shape == (0, 4, D)
    assert lg.RMSNorm(D)(torch.randn(D)).shape == (D,)   # 1-D: one row


def test_modules_parameters_state_dict_and_forward():
    ln = lg.LayerNorm(D, eps=1e-6, group_size=64, norm_before_gate=False, dtype=torch.float64)
    rms = lg.RMSNorm(D, group_size=64, norm_before_gate=False)
    assert list(ln.state_dict()) == ["weight", "bias"] and list(rms.state_dict()) == ["weight"]
    assert rms.bias is None and [n for n, _ in rms.named_parameters()] == ["weight"]
    assert ln.weight.dtype == torch.float64 and rms.weight.dtype == torch.float32
    assert torch.equal(ln.weight, torch.ones(D, dtype=torch.float64))
    assert torch.equal(ln.bias, torch.zeros(D, dtype=torch.float64))
    assert (ln.eps, ln.group_size, ln.norm_before_gate) == (1e-6, 64, False)
    assert rms.eps == 1e-5
    # a checkpoint of mamba-ssm's modules (same keys) loads strictly
    sd = {"weight": torch.randn(D)}
    rms.load_state_dict(sd, strict=True)
    ln.load_state_dict({"weight": torch.randn(D), "bias": torch.randn(D)}, strict=True)
    x, _, _, z = _inputs(torch.float32, False, True)
    torch.testing.assert_close(rms(x, z), lg.rmsnorm_fn(x, rms.weight, None, z, 1e-5, 64,
                                                        False), rtol=0, atol=0)
    xd, zd = x.double(), z.double()
    torch.testing.assert_close(ln(xd, zd), lg.layernorm_fn(xd, ln.weight, ln.bias, zd, 1e-6, 64,
                                                           False), rtol=0, atol=0)
    assert rms(x).shape == x.shape                      # z optional
    rms.reset_parameters()
    ln.reset_parameters()
    assert torch.equal(rms.weight, torch.ones(D)) and torch.equal(ln.bias, torch.zeros(D,
                                                                  dtype=torch.float64))
    rms(x, z).sum().backward()
    assert rms.weight.grad.shape == (D,)


def test_one_implementation_with_the_layers_rmsnorm():
    """lightning_ops.layers.RMSNorm(gate_fn='silu') and the mirror's RMSNorm are the same
    function (lightning_ops.norm.gated_norm): equal to the bit."""
    layers = pytest.importorskip("lightning_ops.layers")
    x, w, _, z = _inputs(torch.bfloat16, False, True)
    for nbg in (True, False):
        ours = layers.RMSNorm(D, eps=1e-5, group_size=64, gate_fn="silu", norm_before_gate=nbg)
        peer = lg.RMSNorm(D, eps=1e-5, group_size=64, norm_before_gate=nbg)
        with torch.no_grad():
            ours.weight.copy_(w)
            peer.weight.copy_(w)
        assert torch.equal(ours(x, z), peer(x, z))


@pytest.mark.usefixtures("clean_peers")
def test_import_path_after_patch_mamba_ssm_alias_mode():
    skip_if_installed("mamba_ssm")
    assert lc.patch_mamba_ssm() == "alias"
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated
    from mamba_ssm.ops.triton.layernorm_gated import (LayerNorm, layernorm_fn, rms_norm_ref,
                                                      rmsnorm_fn)
    assert (RMSNormGated, LayerNorm, layernorm_fn, rmsnorm_fn, rms_norm_ref) == (
        lg.RMSNorm, lg.LayerNorm, lg.layernorm_fn, lg.rmsnorm_fn, lg.rms_norm_ref)
    norm = RMSNormGated(D, eps=1e-5, norm_before_gate=False, group_size=D // 2)
    x = torch.randn(2, 3, D)
    assert norm(x, torch.randn(2, 3, D)).shape == x.shape
    with pytest.raises(ImportError):
        from mamba_ssm.ops.triton.layernorm_gated import LayerNormFn  # noqa: F401
    lc.unpatch()
    with pytest.raises(ImportError):
        import mamba_ssm.ops.triton.layernorm_gated  # noqa: F401


@pytest.mark.usefixtures("clean_peers")
def test_replace_mode_swaps_the_norms_and_keeps_the_peers_reference(tmp_path, monkeypatch):
    """An installed-looking mamba-ssm (a fake: the real one needs CUDA): patching replaces its
    layernorm_fn / rmsnorm_fn / LayerNorm / RMSNorm, also where its Mamba2 module bound RMSNorm
    as RMSNormGated, keeps its rms_norm_ref (the peer's ground truth), and unpatch restores."""
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "modules").mkdir()
    for d in (pkg, pkg / "ops", pkg / "ops" / "triton", pkg / "modules"):
        (d / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "layernorm_gated.py").write_text(
        "".join(f"def {n}(*a, **k):\n    return 'theirs'\n"
                for n in ("layernorm_fn", "rmsnorm_fn", "rms_norm_ref"))
        + "class LayerNorm:\n    pass\nclass RMSNorm:\n    pass\n")
    (pkg / "modules" / "mamba2.py").write_text(
        "from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mamba_ssm.modules.mamba2 as peer_mamba2
    import mamba_ssm.ops.triton.layernorm_gated as peer
    theirs = {n: getattr(peer, n) for n in lg.__all__}
    with pytest.warns(RuntimeWarning, match="could not be imported"):   # the fake's gaps
        assert lc.patch_mamba_ssm(layers=False) == "replace"
    for n in ("layernorm_fn", "rmsnorm_fn", "LayerNorm", "RMSNorm"):
        assert getattr(peer, n) is getattr(lg, n)
    assert peer.rms_norm_ref is theirs["rms_norm_ref"]
    assert peer_mamba2.RMSNormGated is lg.RMSNorm
    lc.unpatch("mamba_ssm")
    assert {n: getattr(peer, n) for n in lg.__all__} == theirs
    assert peer_mamba2.RMSNormGated is theirs["RMSNorm"]
