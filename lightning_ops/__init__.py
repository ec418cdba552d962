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

try:  # the other families (their own modules; present once their ops exist)
    from .delta.ops import (  # noqa: F401
        chunk_delta_rule, chunk_gated_delta_rule,
        fused_recurrent_delta_rule, fused_recurrent_gated_delta_rule,
    )
    __all__ += ["chunk_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_delta_rule",
                "fused_recurrent_gated_delta_rule"]
except ImportError:  # pragma: no cover - removed once the family lands
    pass
