"""Log-linear attention (Guo et al. 2025): a Fenwick hierarchy of O(log T) states per token, over
the scalar gate (Mamba-2 / simple GLA: ops.py) and over the gated delta rule (delta.py)."""
from .delta import (chunk_log_linear_gated_delta_rule,
                    fused_recurrent_log_linear_gated_delta_rule, log_linear_gated_delta_rule_step)
from .ops import (LogLinearAttentionState, chunk_log_linear_attn, fused_recurrent_log_linear_attn,
                  hmamba_chunk_scan_combined, log_linear_attn_step)

__all__ = ["LogLinearAttentionState", "chunk_log_linear_attn", "fused_recurrent_log_linear_attn",
           "log_linear_attn_step", "hmamba_chunk_scan_combined",
           "chunk_log_linear_gated_delta_rule", "fused_recurrent_log_linear_gated_delta_rule",
           "log_linear_gated_delta_rule_step"]
