"""Context parallelism on torch.distributed (LASP-2: one all-gather of per-rank (transition,
state) summaries per op call). Build a context once per step with build_cp_context(cu_seqlens,
group) and pass it as cp_context= to the wrappers here, which take the public ops' arguments."""
from .context import CPContext, build_cp_context
from .ops import (
    causal_conv1d_fn,
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_kda,
    chunk_linear_attn,
    chunk_log_linear_attn,
    chunk_log_linear_gated_delta_rule,
    chunk_simple_gla,
    hmamba_chunk_scan_combined,
    lightning_attn,
    mamba_chunk_scan_combined,
)

__all__ = [
    "CPContext", "build_cp_context", "chunk_linear_attn", "chunk_simple_gla", "lightning_attn",
    "chunk_gla", "chunk_delta_rule", "chunk_gated_delta_rule", "chunk_kda",
    "mamba_chunk_scan_combined", "causal_conv1d_fn", "chunk_log_linear_attn",
    "chunk_log_linear_gated_delta_rule", "hmamba_chunk_scan_combined",
]
