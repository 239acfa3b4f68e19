"""The native decode attention kernel (`tunehouse.inference.native`) computes what PyTorch's
attention computes, on the cache layouts the engine gives it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.inference.test_quantize import _model
from tunehouse.inference.decode import fast_decoder
from tunehouse.inference.native import decode_attention

# Built wherever there is a compiler (CI's machines have one): a failed build fails here, rather
# than leaving the kernel untested behind the fallback.
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None,
    reason="no C++ compiler or ninja to build the native kernels",
)


def _reference(q, k, v, mask, scale):
    """PyTorch's attention, each query head against its KV head, in float64."""
    rows, heads, dim = q.shape
    group = heads // k.shape[1]
    keys, values = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    bias = None if mask is None else mask.double()[:, None, None, :]
    out = F.scaled_dot_product_attention(q.double()[:, :, None], keys, values, attn_mask=bias, scale=scale)
    return out.reshape(rows, heads * dim).float()


@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "dim", "length"),
    [(16, 9, 3, 64, 85), (5, 4, 4, 128, 17), (1, 8, 1, 32, 1), (3, 4, 2, 16, 100)],
)
def test_it_matches_pytorch_attention_on_a_position_major_cache_with_padding(
    rows, heads, kv_heads, dim, length
):
    kernel = decode_attention()
    assert kernel is not None, "the native kernel did not build (see the log)"
    gen = torch.Generator().manual_seed(rows * length + dim)
    # The engine's cache: [capacity, rows, KV heads, dim] buffers, seen as [rows, KV heads, length, dim].
    capacity = length + 7
    k_buffer = torch.randn(capacity, rows, kv_heads, dim, generator=gen)
    v_buffer = torch.randn(capacity, rows, kv_heads, dim, generator=gen)
    k, v = (b[:length].permute(1, 2, 0, 3) for b in (k_buffer, v_buffer))
    q = torch.randn(rows, heads, dim, generator=gen) * 3  # peaked softmaxes, not only flat ones
    mask = torch.zeros(rows, length)
    mask[0, : length // 2] = float("-inf")  # left padding
    if length > 4:
        mask[-1, 1:3] = float("-inf")  # padding between a cached beginning and the rest
    scale = dim**-0.5
    for m in (mask, None):
        got = kernel(q, k, v, m, scale)
        assert got.shape == (rows, heads * dim)
        torch.testing.assert_close(got, _reference(q, k, v, m, scale), atol=2e-5, rtol=1e-4)
    # Any strides with a contiguous head dimension: batch-major too.
    k2, v2 = k.contiguous(), v.contiguous()
    torch.testing.assert_close(kernel(q, k2, v2, mask, scale), kernel(q, k, v, mask, scale))


def test_it_refuses_what_it_does_not_handle():
    kernel = decode_attention()
    assert kernel is not None
    q, kv = torch.randn(2, 4, 48), torch.randn(2, 2, 5, 48)
    with pytest.raises(RuntimeError, match="head dim"):
        kernel(q, kv, kv, None, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(q.double(), kv.double(), kv.double(), None, 1.0)


def test_the_decoder_attends_with_it_on_a_cpu(tiny_model_dir):
    decoder = fast_decoder(_model(tiny_model_dir, torch.float32))
    assert decoder is not None and decoder.native is not None
