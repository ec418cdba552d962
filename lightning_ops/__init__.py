"""lightning_ops: kernels for linear-attention and state-space sequence models.

Public functional API (drop-in for fla, mamba-ssm and causal-conv1d signatures). Every op is a
torch.library custom op with autograd, so torch.compile(fullgraph=True) traces through it.
"""
from .backend import BackendUnavailableError, use_backend
from .gla.ops import (
    chunk_gla,
    chunk_linear_attn,
    chunk_simple_gla,
    fused_recurrent_gla,
    fused_recurrent_lightning_attn,
    fused_recurrent_linear_attn,
    fused_recurrent_simple_gla,
    lightning_attn,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "use_backend",
    "chunk_linear_attn", "chunk_simple_gla", "lightning_attn", "chunk_gla",
    "fused_recurrent_linear_attn", "fused_recurrent_simple_gla",
    "fused_recurrent_lightning_attn", "fused_recurrent_gla",
]

from .delta.ops import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_kda,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_kda,
)
from .ssm.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
)

__all__ += [
    "chunk_delta_rule", "chunk_gated_delta_rule", "chunk_kda", "fused_recurrent_kda",
    "fused_recurrent_delta_rule", "fused_recurrent_gated_delta_rule",
    "selective_scan_fn", "mamba_chunk_scan_combined", "selective_state_update",
    "causal_conv1d_fn", "causal_conv1d_update",
]

from .lion.ops import lion_attn

__all__ += ["lion_attn"]

from . import cp  # noqa: E402  context parallel (lightning_ops.cp.build_cp_context + wrappers)

from .loglinear import (LogLinearAttentionState, chunk_log_linear_attn,  # noqa: E402
                        fused_recurrent_log_linear_attn, log_linear_attn_step)

__all__ += ["LogLinearAttentionState", "chunk_log_linear_attn", "fused_recurrent_log_linear_attn",
            "log_linear_attn_step"]
