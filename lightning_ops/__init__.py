"""lightning_ops: kernels for linear-attention and state-space sequence models.

Public functional API (drop-in for fla, mamba-ssm and causal-conv1d signatures). Every op is a
torch.library custom op with autograd, so torch.compile(fullgraph=True) traces through it.
Where things live: ARCHITECTURE.md.
"""
from . import cp  # context parallel: lightning_ops.cp.build_cp_context + cp_context= wrappers
from .backend import BackendUnavailableError, use_backend
from .delta.ops import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_kda,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_kda,
)
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
from .lion.ops import lion_attn
from .loglinear import (
    LogLinearAttentionState,
    chunk_log_linear_attn,
    chunk_log_linear_gated_delta_rule,
    fused_recurrent_log_linear_attn,
    fused_recurrent_log_linear_gated_delta_rule,
    log_linear_attn_step,
    log_linear_gated_delta_rule_step,
)
from .ssm.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "use_backend", "cp",
    # gated linear attention
    "chunk_linear_attn", "chunk_simple_gla", "lightning_attn", "chunk_gla",
    "fused_recurrent_linear_attn", "fused_recurrent_simple_gla",
    "fused_recurrent_lightning_attn", "fused_recurrent_gla",
    # delta rule
    "chunk_delta_rule", "chunk_gated_delta_rule", "chunk_kda",
    "fused_recurrent_delta_rule", "fused_recurrent_gated_delta_rule", "fused_recurrent_kda",
    # selective scans and convolution
    "selective_scan_fn", "mamba_chunk_scan_combined", "selective_state_update",
    "causal_conv1d_fn", "causal_conv1d_update",
    # bidirectional and log-linear attention
    "lion_attn",
    "LogLinearAttentionState", "chunk_log_linear_attn", "fused_recurrent_log_linear_attn",
    "log_linear_attn_step", "chunk_log_linear_gated_delta_rule",
    "fused_recurrent_log_linear_gated_delta_rule", "log_linear_gated_delta_rule_step",
]
