"Quick checks of tiny_turboquant.turboquant (the paper-reproduction tests live in nbs/03_beta_codebook.ipynb)."
import warnings

import pytest
import torch

from tiny_turboquant.turboquant import (TinyQuantizer, TinyQuantizerIP, attention_weights, beta_codebook,
                                        packed_bytes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_roundtrip_near_optimum(bits):
    x = torch.randn(4000, 128, generator=torch.Generator().manual_seed(7))
    x = x / x.norm(dim=-1, keepdim=True)
    q = TinyQuantizer(128, bits, seed=1)
    codes = q.quantize(x)
    assert codes.codes.shape == (4000, packed_bytes(128, bits)) and codes.codes.dtype == torch.uint8
    err = (x - q.dequantize(codes)).square().sum(-1).mean().item()
    assert err == pytest.approx(beta_codebook(128, bits).distortion, rel=0.03)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_shapes(dtype):
    x = torch.randn(2, 3, 64, dtype=dtype)
    for q in (TinyQuantizer(64, 3), TinyQuantizerIP(64, 3)):
        out = q.dequantize(q.quantize(x), dtype)
        assert out.shape == x.shape and out.dtype == dtype


def test_bad_input():
    with pytest.raises(ValueError, match="bits"): TinyQuantizer(128, 5)
    with pytest.raises(ValueError, match="bits"): TinyQuantizerIP(128, 1)
    with pytest.raises(ValueError, match="dim"): TinyQuantizer(2, 2)
    q = TinyQuantizer(128, 2)
    with pytest.raises(ValueError, match="last dimension"): q.quantize(torch.randn(3, 64))
    with pytest.raises(ValueError, match="NaN"): q.quantize(torch.full((1, 128), float("nan")))
    with pytest.raises(TypeError, match="float16"): q.quantize(torch.ones(1, 128, dtype=torch.int64))


def test_ip_warns_only_in_attention():
    x = torch.randn(1, 8, 32)
    ip = TinyQuantizerIP(32, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ip.inner_product(x[0, 0], ip.quantize(x))
        attention_weights(x, x, TinyQuantizer(32, 3))
    with pytest.warns(DeprecationWarning, match="TinyQuantizerIP"):
        attention_weights(x, x, ip)
