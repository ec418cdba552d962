"""Mirror of `causal_conv1d.causal_conv1d_varlen` (lightning_ops.compat): causal_conv1d_varlen_states (torch gather, forward only) and its reference."""
from lightning_ops.compat._refs import (  # noqa: F401
    causal_conv1d_varlen_states,
    causal_conv1d_varlen_states_ref,
)

__all__ = ['causal_conv1d_varlen_states', 'causal_conv1d_varlen_states_ref']
