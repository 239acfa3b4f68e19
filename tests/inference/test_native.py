"""The native decode ops (`tunehouse.inference.native`) compute what PyTorch's ops compute, on the
layouts the engine gives them."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.inference.test_quantize import _model
from tunehouse.inference.decode import fast_decoder
from tunehouse.inference.native import native_ops
from tunehouse.inference.quantize import SharedInput

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
    ops = native_ops()
    assert ops is not None, "the native ops did not build (see the log)"
    kernel = ops.decode_attention
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
    # Masked positions weigh exactly nothing, whatever they hold.
    if length > 1:
        before = kernel(q, k, v, mask, scale)
        v_buffer[: length // 2, 0] = 1e38
        assert torch.equal(kernel(q, k, v, mask, scale), before)


def test_it_refuses_what_it_does_not_handle():
    kernel = native_ops().decode_attention
    q, kv = torch.randn(2, 4, 48), torch.randn(2, 2, 5, 48)
    with pytest.raises(RuntimeError, match="head dim"):
        kernel(q, kv, kv, None, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(q.double(), kv.double(), kv.double(), None, 1.0)


def test_rms_norm_matches_pytorch():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(16, 576, generator=gen) * 5, torch.randn(576, generator=gen)
    got = native_ops().rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (576,), weight, 1e-5), atol=1e-6, rtol=1e-6)
    strided = torch.randn(3, 1000, generator=gen)[:, :576]  # a row stride longer than the row
    torch.testing.assert_close(
        native_ops().rms_norm(strided, weight, 1e-5), F.rms_norm(strided, (576,), weight, 1e-5)
    )


def test_int8_inputs_are_pytorchs_exactly_and_the_int8_matmul_stays_the_same():
    gen = torch.Generator().manual_seed(1)
    linears = [torch.nn.Linear(96, 40, bias=False), torch.nn.Linear(96, 24, bias=False)]
    x = torch.randn(16, 96, generator=gen)
    x[:, 7] *= 40  # an outlier channel
    group = SharedInput(linears, x.abs().amax(0))
    scaled, peak, outliers = native_ops().int8_inputs(x, group.keep, group.outliers)
    inner = x * group.keep
    want_peak = inner.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8)
    assert torch.equal(peak, want_peak)
    assert torch.equal(scaled, inner / want_peak)
    assert torch.equal(outliers, x.index_select(1, group.outliers))
    assert 7 in group.outliers.tolist() and bool((scaled[:, 7] == 0).all())
    native = group.matmul(x)
    group.native = None  # PyTorch's ops
    torch.testing.assert_close(native, group.matmul(x), atol=0, rtol=0)
    zeros = torch.zeros(2, 96)  # the peak's floor: no division by zero
    group.native = native_ops()
    assert bool(group.matmul(zeros).eq(0).all())


def test_the_decoder_uses_them_on_a_cpu(tiny_model_dir):
    decoder = fast_decoder(_model(tiny_model_dir, torch.float32))
    assert decoder is not None and decoder.native is not None and decoder.native_attention


def test_a_build_lock_left_by_an_interrupted_build_is_removed(tmp_path, monkeypatch):
    from tunehouse.inference import native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = native._build_directory()
    assert folder.is_dir() and tmp_path in folder.parents
    lock = folder / "lock"
    lock.touch()
    native._build_directory()
    assert lock.exists()  # a build may be running: left alone
    os.utime(lock, (0, 0))
    native._build_directory()
    assert not lock.exists()
