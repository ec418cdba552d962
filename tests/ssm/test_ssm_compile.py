"""Every SSM op traces under torch.compile(fullgraph=True) (fake impls + autograd), and the
compiled forward/backward equal eager's."""
import torch

from lightning_ops.ssm.ops import (causal_conv1d_fn, causal_conv1d_update,
                                   mamba_chunk_scan_combined, selective_scan_fn,
                                   selective_state_update)
from ssm_cases import conv_inputs, scan_inputs, ssd_inputs


def test_compile_fullgraph_all_ops():
    s = scan_inputs(1, 4, 3, 20, 2, dtype=torch.float32)
    d = ssd_inputs(1, 20, 2, 3, 1, 4, h0=True, dtype=torch.float32)
    c = conv_inputs(1, 4, 20, 4, h0=True, dtype=torch.float32)

    def f(s, d, c, state, conv_state):
        y, last = selective_scan_fn(s["u"], s["delta"], s["A"], s["B"], s["C"], s["D"], s["z"],
                                    s["delta_bias"], True, True)
        y2, fin = mamba_chunk_scan_combined(d["x"], d["dt"], d["A"], d["B"], d["C"], 16,
                                            D=d["D"], z=d["z"], dt_bias=d["dt_bias"],
                                            initial_states=d["initial_states"],
                                            dt_softplus=True, dt_limit=(0.0, 2.0),
                                            return_final_states=True)
        y3, fin3 = causal_conv1d_fn(c["x"], c["weight"], c["bias"], c["initial_states"], True,
                                    "silu")
        o4 = selective_state_update(state, y2[:, -1].detach(), d["dt"][:, -1, :, None]
                                    .detach().expand(1, 2, 3), d["A"].detach()[:, None, None]
                                    .expand(2, 3, 4), d["B"][:, -1].detach(),
                                    d["C"][:, -1].detach(), dt_softplus=True)
        o5 = causal_conv1d_update(y3[..., -1].detach(), conv_state, c["weight"].detach())
        loss = (y.sum() + last.sum() + y2.square().sum() + fin.sum() + y3.sum() + fin3.sum())
        return loss, o4, o5

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        state, conv_state = torch.ones(1, 2, 3, 4), torch.ones(1, 4, 3)
        loss, o4, o5 = fn(s, d, c, state, conv_state)
        leaves = [t for dct in (s, d, c) for t in dct.values() if t is not None]
        grads = torch.autograd.grad(loss, leaves)
        results.append((loss, o4, o5, state, conv_state) + tuple(grads))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
