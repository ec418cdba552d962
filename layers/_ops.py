"""The public lightning_ops functions the layers call, looked up once at import.

Layers only ever call the public functional API. Families whose functions are not yet exported
from `lightning_ops/__init__.py` are found in their public `ops` module; a function that exists
nowhere becomes a stub raising a clear error when called (so `import layers` never fails).
"""
from __future__ import annotations

import importlib

import lightning_ops

_FAMILY_MODULES = ("lightning_ops.gla.ops", "lightning_ops.delta.ops", "lightning_ops.ssm.ops")


def _missing(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"lightning_ops.{name} is not available in this install; "
                                  f"the layer that needs it cannot run")
    stub.__name__ = name
    return stub


def _find(name: str):
    fn = getattr(lightning_ops, name, None)
    if fn is not None:
        return fn
    for mod in _FAMILY_MODULES:
        try:
            fn = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            fn = None
        if fn is not None:
            return fn
    return _missing(name)


chunk_gla = _find("chunk_gla")
fused_recurrent_gla = _find("fused_recurrent_gla")
chunk_simple_gla = _find("chunk_simple_gla")
fused_recurrent_simple_gla = _find("fused_recurrent_simple_gla")
lightning_attn = _find("lightning_attn")
fused_recurrent_lightning_attn = _find("fused_recurrent_lightning_attn")
chunk_delta_rule = _find("chunk_delta_rule")
fused_recurrent_delta_rule = _find("fused_recurrent_delta_rule")
chunk_gated_delta_rule = _find("chunk_gated_delta_rule")
fused_recurrent_gated_delta_rule = _find("fused_recurrent_gated_delta_rule")
chunk_kda = _find("chunk_kda")
fused_recurrent_kda = _find("fused_recurrent_kda")
selective_scan_fn = _find("selective_scan_fn")
selective_state_update = _find("selective_state_update")
mamba_chunk_scan_combined = _find("mamba_chunk_scan_combined")
causal_conv1d_fn = _find("causal_conv1d_fn")
causal_conv1d_update = _find("causal_conv1d_update")
