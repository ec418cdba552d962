"""Bad input raises a clear error before any compute, naming the tensor, and mutates nothing."""
import pytest
import torch

import lightning_ops as lo

B, T, H, K, V = 2, 8, 3, 16, 12


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, T, H, K, generator=g, dtype=dtype),
            torch.randn(B, T, H, K, generator=g, dtype=dtype),
            torch.randn(B, T, H, V, generator=g, dtype=dtype))


def test_wrong_rank_names_tensor_and_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, H, K\].*got \[2, 8, 48\]"):
        lo.chunk_linear_attn(q.flatten(2), k, v)


def test_mismatched_k_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k must have shape .*\[2, 8, 3, 16\], got \[2, 8, 3, 8\]"):
        lo.chunk_linear_attn(q, k[..., :8], v)


def test_mismatched_v_heads():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"v must have shape"):
        lo.chunk_linear_attn(q, k, v[:, :, :2])


def test_gate_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H, K\] = \[2, 8, 3, 16\], got \[2, 8, 3\]"):
        lo.chunk_gla(q, k, v, torch.zeros(B, T, H))
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\]"):
        lo.chunk_simple_gla(q, k, v, g=torch.zeros(B, T, H, K))
    with pytest.raises(ValueError, match=r"g_gamma must have shape \[H\] = \[3\], got \[4\]"):
        lo.chunk_simple_gla(q, k, v, g_gamma=torch.zeros(4))
    with pytest.raises(ValueError, match=r"slope must have shape \[H\]"):
        lo.lightning_attn(q, k, v, torch.zeros(H, 1))
    with pytest.raises(ValueError, match="g is required"):
        lo.chunk_gla(q, k, v, None)


def test_unsupported_and_mismatched_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q must be float16, bfloat16, float32 or float64, got torch.int64"):
        lo.chunk_linear_attn(q.long(), k, v)
    with pytest.raises(TypeError, match=r"k has dtype torch.float16 but q has torch.float32"):
        lo.chunk_linear_attn(q, k.half(), v)
    with pytest.raises(TypeError, match=r"g must be float16, bfloat16, float32 or float64, got torch.int32"):
        lo.chunk_simple_gla(q, k, v, g=torch.zeros(B, T, H, dtype=torch.int32))


def test_mismatched_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"v is on meta but the inputs are on cpu"):
        lo.chunk_linear_attn(q, k, v.to("meta"))


def test_head_dim_over_maximum():
    q = torch.randn(1, 4, 1, 300)
    v = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match=r"head dim is 300, over the supported maximum of 256"):
        lo.chunk_delta_rule(q, q.clone(), v, torch.rand(1, 4, 1))
    q = torch.randn(1, 4, 1, 513)
    with pytest.raises(ValueError, match=r"head dim is 513, over the supported maximum of 512"):
        lo.chunk_linear_attn(q, q.clone(), v)


@pytest.mark.parametrize("cu, match", [
    ([0, 3, 8.0], "cu_seqlens must be int32 or int64"),
    ([1, 3, 8], "must start at 0"),
    ([0, 5, 3, 8], "non-decreasing"),
    ([0, 3, 7], "end at T=8"),
])
def test_bad_cu_seqlens(cu, match):
    q, k, v = (x[:1] for x in _qkv())
    cu_t = torch.tensor(cu)
    if cu_t.is_floating_point() is False:
        cu_t = cu_t.to(torch.int32)
    with pytest.raises((ValueError, TypeError), match=match):
        lo.chunk_linear_attn(q, k, v, cu_seqlens=cu_t)


def test_cu_seqlens_needs_batch_one():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="batch size must be 1"):
        lo.chunk_linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_bad_initial_state_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \[2, 3, 16, 12\], got \[2, 3, 12, 16\]"):
        lo.chunk_linear_attn(q, k, v, initial_state=torch.zeros(B, H, V, K))
    q1, k1, v1 = (x[:1] for x in (q, k, v))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \[2, 3, 16, 12\], got \[1, 3, 16, 12\]"):
        lo.chunk_linear_attn(q1, k1, v1, initial_state=torch.zeros(1, H, K, V), cu_seqlens=cu)


def test_option_types():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="scale must be a Python float"):
        lo.chunk_linear_attn(q, k, v, scale=torch.tensor(0.5))
    with pytest.raises(TypeError, match="output_final_state must be a bool"):
        lo.chunk_linear_attn(q, k, v, output_final_state="yes")


def test_nothing_mutated_on_error():
    q, k, v = _qkv()
    h0 = torch.randn(B, H, K, V)
    before = [x.clone() for x in (q, k, v, h0)]
    with pytest.raises(ValueError):
        lo.chunk_gla(q, k, v, torch.zeros(B, T, H), initial_state=h0)
    for x, y in zip((q, k, v, h0), before):
        assert torch.equal(x, y)
