"""Log-linear attention (Guo et al. 2025): a Fenwick hierarchy of O(log T) states per token."""
from .ops import (LogLinearAttentionState, chunk_log_linear_attn, fused_recurrent_log_linear_attn,
                  hmamba_chunk_scan_combined, log_linear_attn_step)

__all__ = ["LogLinearAttentionState", "chunk_log_linear_attn", "fused_recurrent_log_linear_attn",
           "log_linear_attn_step", "hmamba_chunk_scan_combined"]
