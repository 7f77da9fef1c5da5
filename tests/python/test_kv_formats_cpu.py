"""CPU tests of flash_mla.kv_formats: byte layouts, scales, round-trip error bounds, padded
pages, non-finite inputs and the in-place token writers of the three FP8 KV-cache formats.

Error bounds checked here (stated in docs/kv-formats.md):

* power-of-two group scales ``s`` (both sparse formats): ``|deq - x| <= max(2**-4 * |x|,
  2**-10 * s)``. Dividing by a power of two is exact, so the only error is rounding ``x / s``
  (at most 448 by the choice of ``s``) to e4m3: 3 mantissa bits give a half-step of at most
  ``2**-4`` of the value in the normal range (``>= 2**-6``), and the subnormal step is
  ``2**-9`` (half-step ``2**-10``).
* dense per-tensor ``descale = amax / 448``: the same bound with ``s = descale``, widened by
  ``2**-20`` relative for the float32 rounding of ``x / descale``.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flash_mla import kv_formats as kvf




def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spread(shape, seed, lo=-4.0, hi=4.0, dtype=torch.bfloat16):
    """Random values whose magnitudes span 10**lo .. 10**hi, both signs."""
    g = _gen(seed)
    mag = torch.pow(10.0, torch.empty(shape).uniform_(lo, hi, generator=g))
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).to(dtype)


def _assert_pow2_bound(x: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor, rel_slack=0.0):
    """|deq - x| <= max(2**-4 |x|, 2**-10 s) elementwise (all float64)."""
    x, deq, scale = x.double(), deq.double(), scale.double()
    err = (deq - x).abs()
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + rel_slack)
    bad = err > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} values exceed the bound; worst x={x[bad][0].item()} "
        f"deq={deq[bad][0].item()} scale={scale.expand_as(x)[bad][0].item()}")


def _f32_bytes(v: float) -> list:
    return list(struct.pack("<f", v))


def _bf16_bytes(v: float) -> list:
    return list(torch.tensor([v], dtype=torch.bfloat16).view(torch.uint8).tolist())


def _e4m3_byte(v: float) -> int:
    return int(torch.tensor([v]).to(torch.float8_e4m3fn).view(torch.uint8).item())


# ----------------------------------------------------------------------------------------------
# Dense FP8 (per-tensor scale)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_dense_roundtrip_and_descale(dtype):
    lo, hi = (-3.0, 3.0) if dtype == torch.bfloat16 else (-3.0, 4.0)
    k = _spread((3, 16, 2, 576), 1, lo, hi, dtype)
    k_fp8, descale = kvf.quantize_kv_cache_fp8(k)
    assert k_fp8.dtype == torch.float8_e4m3fn and k_fp8.shape == k.shape
    assert descale.dtype == torch.float32 and descale.shape == (1,) and descale.device == k.device
    amax = k.float().abs().max()
    assert descale.item() == (amax / 448.0).item()
    deq = kvf.dequantize_kv_cache_fp8(k_fp8, descale)
    assert deq.dtype == torch.float32
    _assert_pow2_bound(k, deq, descale, rel_slack=2.0 ** -20)
    # The largest magnitude lands on the largest e4m3 value.
    assert k_fp8.float().abs().max().item() == 448.0
    assert kvf.dequantize_kv_cache_fp8(k_fp8, descale, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_fp8_dense_zero_cache_and_nonfinite():
    z = torch.zeros(2, 16, 1, 576, dtype=torch.bfloat16)
    k_fp8, descale = kvf.quantize_kv_cache_fp8(z)
    assert descale.item() == 1.0
    assert int(k_fp8.view(torch.uint8).max()) == 0

    k = torch.zeros(1, 16, 1, 576, dtype=torch.bfloat16)
    k[0, 0, 0, 0] = 2.0
    k[0, 0, 0, 1] = -1.0
    k[0, 0, 0, 2] = float("nan")
    k[0, 0, 0, 3] = float("inf")
    k[0, 0, 0, 4] = float("-inf")
    k_fp8, descale = kvf.quantize_kv_cache_fp8(k)
    assert descale.item() == pytest.approx(2.0 / 448.0, rel=1e-7)  # non-finite values ignored
    b = k_fp8.view(torch.uint8)[0, 0, 0, :6].tolist()
    assert b[0] == 0x7E and b[1] == _e4m3_byte(-224.0)
    assert b[2] in (0x7F, 0xFF)  # NaN code
    assert b[3] == 0x7E and b[4] == 0xFE  # +-inf saturate to +-448
    assert b[5] == 0

    # Only NaN / inf: amax 0 -> descale 1.
    k2 = torch.full((1, 16, 1, 576), float("nan"), dtype=torch.bfloat16)
    assert kvf.quantize_kv_cache_fp8(k2)[1].item() == 1.0


def test_fp8_dense_valid_mask_and_amax():
    g = _gen(3)
    k = torch.randn(4, 16, 1, 576, generator=g).to(torch.bfloat16)
    block_table = torch.tensor([[2, 0, 3], [1, 3, 3]], dtype=torch.int32)
    seqlens = torch.tensor([20, 5], dtype=torch.int32)
    mask = kvf.used_slots_mask(block_table, seqlens, 4, 16)
    expect = torch.zeros(4, 16, dtype=torch.bool)
    expect[2, :] = True
    expect[0, :4] = True
    expect[1, :5] = True
    assert torch.equal(mask, expect)

    junk = k.clone()
    junk[~mask] = 1e30
    junk[3, 0, 0, 0] = float("nan")
    k_fp8, descale = kvf.quantize_kv_cache_fp8(junk, valid_mask=mask)
    used_amax = k.float()[mask].abs().max()
    assert descale.item() == (used_amax / 448.0).item()
    ref_fp8, _ = kvf.quantize_kv_cache_fp8(k, amax=used_amax)
    assert torch.equal(k_fp8.view(torch.uint8)[mask], ref_fp8.view(torch.uint8)[mask])
    # Junk slots saturate instead of overflowing.
    assert k_fp8.view(torch.uint8)[0, 10, 0, 0].item() == 0x7E

    # A given amax smaller than the data saturates.
    k_fp8, descale = kvf.quantize_kv_cache_fp8(k, amax=1.0)
    assert descale.item() == pytest.approx(1.0 / 448.0, rel=1e-7)
    assert k_fp8.float().abs().max().item() == 448.0

    with pytest.raises(ValueError):
        kvf.quantize_kv_cache_fp8(k, valid_mask=mask[:, :8])
    with pytest.raises(ValueError):
        kvf.quantize_kv_cache_fp8(k[..., :512])
    with pytest.raises(TypeError):
        kvf.quantize_kv_cache_fp8(k.to(torch.int32))


def test_fp8_q_quantization():
    q = _spread((2, 3, 5, 576), 4, -2.0, 2.0)
    q_fp8, descale_q = kvf.quantize_q_fp8(q)
    assert q_fp8.shape == q.shape and descale_q.shape == (1,)
    deq = kvf.dequantize_kv_cache_fp8(q_fp8, descale_q)
    _assert_pow2_bound(q, deq, descale_q, rel_slack=2.0 ** -20)
    with pytest.raises(ValueError):
        kvf.quantize_q_fp8(q[0])


def test_fp8_write_tokens():
    g = _gen(5)
    k = torch.randn(3, 16, 2, 576, generator=g).to(torch.bfloat16)
    _, descale = kvf.quantize_kv_cache_fp8(k)
    cache = torch.zeros(3, 16, 2, 576, dtype=torch.float8_e4m3fn)
    slots = torch.tensor([5, -1, 40, 17], dtype=torch.int64)
    new = torch.randn(4, 2, 576, generator=g).to(torch.bfloat16)
    kvf.write_kv_fp8(cache, slots, new, descale)
    full = torch.zeros(3 * 16, 2, 576, dtype=torch.bfloat16)
    for r, s in enumerate(slots.tolist()):
        if s >= 0:
            full[s] = new[r]
    ref, _ = kvf.quantize_kv_cache_fp8(full.reshape(3, 16, 2, 576), amax=descale * 448.0)
    assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
    with pytest.raises(ValueError):
        kvf.write_kv_fp8(cache, torch.tensor([48]), new[:1], descale)


# ----------------------------------------------------------------------------------------------
# Power-of-two scale exponents
# ----------------------------------------------------------------------------------------------


def test_pow2_scale_exponents_exact():
    amax = torch.tensor([0.0, 448.0, 448.0 * 2 ** -7, 3.5, 1000.0, 224.0, 224.0001, 1e-30,
                         3.0e38, 448.0 * 2 ** -126, 1e-45], dtype=torch.float32)
    e = kvf.pow2_scale_exponents(amax)
    assert e.dtype == torch.int32
    assert e.tolist()[:9] == [-126, 0, -7, -7, 2, -1, 0, math.ceil(math.log2(1e-30 / 448)), 120]
    assert e[9].item() == -126 and e[10].item() == -126
    # Just above a power-of-two boundary (float32 neighbours of 448 * 2**k) goes up one.
    for k in (-20, -3, 0, 5, 30):
        a = torch.tensor([448.0 * 2.0 ** k], dtype=torch.float32)
        above = torch.nextafter(a, torch.tensor([math.inf]))
        below = torch.nextafter(a, torch.tensor([0.0]))
        assert kvf.pow2_scale_exponents(a).item() == k
        assert kvf.pow2_scale_exponents(above).item() == k + 1
        assert kvf.pow2_scale_exponents(below).item() == k
    assert kvf.pow2_scale_exponents(torch.tensor([0.0]), min_exponent=-13).item() == -13


# ----------------------------------------------------------------------------------------------
# V3.2 sparse FP8 (656 bytes per token)
# ----------------------------------------------------------------------------------------------


def _hand_token_v32():
    x = torch.zeros(576)
    x[0:128] = 1.0
    x[5] = 448.0  # group 0: amax 448 -> scale 1
    x[128:256] = -0.5
    x[130] = 3.5  # group 1: amax 3.5 = 448 * 2**-7 -> scale 2**-7
    # group 2 (256..383): all zero -> scale 2**-126
    x[384:512] = 2.0
    x[400] = -1000.0  # group 3: amax 1000 -> scale 4; 250 rounds to e4m3 256
    x[512:576] = torch.arange(64) * 0.25 - 8.0
    return x.to(torch.bfloat16)


def test_v32_hand_built_token_bytes():
    x = _hand_token_v32()
    packed = kvf.quantize_kv_cache_v32(x.reshape(1, 1, 1, 576))
    assert packed.shape == (1, 1, 1, 656) and packed.dtype == torch.uint8
    b = packed.reshape(656).tolist()
    assert b[0] == _e4m3_byte(1.0) == 0x38 and b[5] == 0x7E
    assert b[128] == _e4m3_byte(-64.0) and b[130] == 0x7E  # -0.5 / 2**-7 = -64
    assert b[256:384] == [0] * 128
    assert b[384] == _e4m3_byte(0.5) and b[400] == 0xF8  # -256: sign, exponent 15, mantissa 0
    assert b[512:528] == _f32_bytes(1.0) + _f32_bytes(2.0 ** -7) + _f32_bytes(2.0 ** -126) + _f32_bytes(4.0)
    rope = []
    for v in (torch.arange(64) * 0.25 - 8.0).tolist():
        rope += _bf16_bytes(v)
    assert b[528:656] == rope
    deq = kvf.dequantize_kv_cache_v32(packed).reshape(576)
    expect = x.float().clone()
    expect[400] = -1024.0
    assert torch.equal(deq, expect)


def _v32_scales(packed):
    return packed.view(torch.uint8)[..., 512:528].contiguous().view(torch.float32)


@pytest.mark.parametrize("page", [1, 3, 64])
def test_v32_roundtrip_bound_and_pow2_scales(page):
    x = _spread((2, page, 1, 576), 10 + page, -6.0, 6.0)
    x[0, 0, 0, 128:256] = 0.0  # one all-zero group
    packed = kvf.quantize_kv_cache_v32(x)
    deq = kvf.dequantize_kv_cache_v32(packed)
    assert deq.dtype == torch.float32 and deq.shape == (2, page, 1, 576)
    scales = _v32_scales(packed)  # (2, page, 1, 4)
    m, e = torch.frexp(scales)
    assert bool((m == 0.5).all()), "scales must be powers of two"
    amax = x.float()[..., :512].reshape(2, page, 1, 4, 128).abs().amax(-1)
    assert bool((amax <= 448.0 * scales).all())
    nz = amax > 0
    assert bool((amax[nz] > 224.0 * scales[nz]).all()), "scale must be the smallest power of two"
    assert bool((scales[~nz] == 2.0 ** -126).all())
    per_channel = scales.repeat_interleave(128, dim=-1)
    _assert_pow2_bound(x[..., :512], deq[..., :512], per_channel)
    assert torch.equal(deq[..., 512:], x[..., 512:].float())  # RoPE is exact


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), lo=st.floats(-30.0, 30.0), width=st.floats(0.0, 8.0))
def test_v32_roundtrip_bound_property(seed, lo, width):
    x = _spread((1, 2, 1, 576), seed, lo, lo + width)
    packed = kvf.quantize_kv_cache_v32(x)
    deq = kvf.dequantize_kv_cache_v32(packed)
    per_channel = _v32_scales(packed).repeat_interleave(128, dim=-1)
    _assert_pow2_bound(x[..., :512], deq[..., :512], per_channel)


def test_v32_extreme_and_nonfinite_values():
    x = torch.zeros(1, 4, 1, 576, dtype=torch.bfloat16)
    x[0, 0, 0, :512] = torch.finfo(torch.bfloat16).max  # huge
    x[0, 0, 0, 7] = -torch.finfo(torch.bfloat16).max
    x[0, 1, 0, :512] = -1e-30  # tiny, negative
    x[0, 2, 0, 0] = float("nan")
    x[0, 2, 0, 1] = float("inf")
    x[0, 2, 0, 2] = 3.0
    x[0, 2, 0, 512] = float("nan")  # RoPE is stored verbatim
    packed = kvf.quantize_kv_cache_v32(x)
    deq = kvf.dequantize_kv_cache_v32(packed)
    s = _v32_scales(packed)
    assert bool(torch.isfinite(deq[0, 0]).all()) and bool(torch.isfinite(s).all())
    _assert_pow2_bound(x[0, :2, :, :512], deq[0, :2, :, :512], s[0, :2].repeat_interleave(128, -1))
    assert deq[0, 0, 0, 7].item() < 0
    b = packed[0, 2, 0].tolist()
    assert s[0, 2, 0, 0].item() == 2.0 ** -7  # amax over finite values: 3.0
    assert b[0] in (0x7F, 0xFF) and b[1] == 0x7E  # NaN code; inf saturates to 448 * scale
    assert math.isnan(deq[0, 2, 0, 512].item())
    assert torch.equal(deq[0, 3], torch.zeros(1, 576))  # all-zero token


def test_v32_padded_page_stride_and_dtypes():
    x = _spread((3, 5, 1, 576), 21, -2.0, 2.0)
    dense = kvf.quantize_kv_cache_v32(x)
    assert dense.stride() == (5 * 656, 656, 656, 1)
    padded = kvf.quantize_kv_cache_v32(x, page_stride=5 * 656 + 13)
    assert padded.stride()[0] == 5 * 656 + 13 and padded.shape == (3, 5, 1, 656)
    assert torch.equal(padded, dense)
    raw = padded.as_strided((3, 5 * 656 + 13), (5 * 656 + 13, 1))
    assert int(raw[:, 5 * 656:].abs().max()) == 0  # padding is zero
    want = kvf.dequantize_kv_cache_v32(dense)
    assert torch.equal(kvf.dequantize_kv_cache_v32(padded), want)
    # A view into a foreign buffer: pages at an odd stride, starting at an odd offset.
    buf = torch.full((3 * 3331 + 7,), 0xAB, dtype=torch.uint8)
    view = buf.as_strided((3, 5, 1, 656), (3331, 656, 656, 1), storage_offset=7)
    view.copy_(dense)
    assert torch.equal(kvf.dequantize_kv_cache_v32(view), want)
    for dt in (torch.float8_e4m3fn, torch.int8):
        alt = kvf.quantize_kv_cache_v32(x, dtype=dt)
        assert alt.dtype == dt and torch.equal(alt.view(torch.uint8), dense)
        assert torch.equal(kvf.dequantize_kv_cache_v32(alt), want)
    with pytest.raises(ValueError):
        kvf.quantize_kv_cache_v32(x, page_stride=5 * 656 - 1)
    with pytest.raises(ValueError):
        kvf.quantize_kv_cache_v32(x[..., :512])
    with pytest.raises(TypeError):
        kvf.dequantize_kv_cache_v32(dense.to(torch.int32))


def test_v32_write_tokens():
    g = _gen(22)
    cache = kvf.new_kv_cache_v32(3, 4, page_stride=4 * 656 + 656, dtype=torch.float8_e4m3fn)
    new = torch.randn(5, 576, generator=g).to(torch.bfloat16)
    slots = torch.tensor([0, 11, -1, 6, 3], dtype=torch.int32)
    kvf.write_kv_v32(cache, slots, new)
    full = torch.zeros(12, 576, dtype=torch.bfloat16)
    for r, s in enumerate(slots.tolist()):
        if s >= 0:
            full[s] = new[r]
    ref = kvf.quantize_kv_cache_v32(full.reshape(3, 4, 1, 576)).reshape(12, 656)
    got = cache.view(torch.uint8).reshape(12, 656)
    written = [0, 11, 6, 3]
    assert torch.equal(got[written], ref[written])
    others = [s for s in range(12) if s not in written]
    assert int(got[others].max()) == 0  # untouched slots keep their (zero) bytes
    ref = ref.reshape(3, 4, 1, 656)
    kvf.write_kv_v32(cache, torch.tensor([2]), new[:1, None])  # (n, 1, 576) also accepted
    assert torch.equal(cache.view(torch.uint8)[0, 2], ref[0, 0])
    with pytest.raises(ValueError):
        kvf.write_kv_v32(cache, torch.tensor([12]), new[:1])
    with pytest.raises(ValueError):
        kvf.write_kv_v32(cache, torch.tensor([1, 2]), new[:1])


# ----------------------------------------------------------------------------------------------
# 512-dim sparse FP8 (576-byte records + 8-byte scale records per page)
# ----------------------------------------------------------------------------------------------


def test_model1_page_bytes():
    for page in (1, 2, 53, 61, 64, 69, 256, 576):
        n = kvf.model1_page_bytes(page)
        assert n % 576 == 0 and page * 584 <= n < page * 584 + 576
    assert kvf.model1_page_bytes(64) == 37440  # 64 * 584 = 37376 -> 65 * 576
    assert kvf.model1_page_bytes(2) == 1728


def test_ue8m0_decoding_matches_torch():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = kvf._ue8m0_to_float(b)
    theirs = b.view(torch.float8_e8m0fnu).to(torch.float32)
    assert torch.equal(ours[:255], theirs[:255]) and math.isnan(ours[255].item())
    assert ours[127].item() == 1.0 and ours[0].item() == 2.0 ** -127 and ours[254].item() == 2.0 ** 127


def _hand_page_model1():
    x = torch.zeros(2, 512)
    x[0, :64] = 1.0
    x[0, 3] = 448.0  # scale 2**0 -> byte 127
    x[0, 64:128] = 3.5  # 448 * 2**-7 -> byte 120
    # channels 128..191 zero -> 2**-126 -> byte 1
    x[0, 192:256] = -1000.0  # scale 4 -> byte 129; e4m3(-250) = -256
    x[0, 256:448] = 0.75  # 0.75 / 448 -> 2**-9 -> byte 118; 0.75 * 512 = 384
    x[0, 448:512] = torch.arange(64) * -0.5
    x[1, :448] = 2.0 ** 20  # scale 2**12 -> byte 139; 2**20 / 2**12 = 256
    x[1, 448:512] = 7.0
    return x.to(torch.bfloat16)


def test_model1_hand_built_page_bytes():
    x = _hand_page_model1()
    packed = kvf.quantize_kv_cache_model1(x.reshape(1, 2, 1, 512))
    assert packed.shape == (1, 2, 1, 584) and packed.stride()[1] == 584
    page = packed.as_strided((1728,), (1,)).tolist()
    # Token 0's record: bytes 0..575; token 1's: 576..1151; scale records at 1152 + 8 * r.
    t0, t1 = page[0:576], page[576:1152]
    assert t0[0] == 0x38 and t0[3] == 0x7E
    assert t0[64] == 0x7E and t0[128:192] == [0] * 64
    assert t0[192] == 0xF8 and t0[256] == _e4m3_byte(384.0)
    rope = []
    for v in (torch.arange(64) * -0.5).tolist():
        rope += _bf16_bytes(v)
    assert t0[448:576] == rope
    assert t1[:448] == [_e4m3_byte(256.0)] * 448 and t1[448:576] == _bf16_bytes(7.0) * 64
    assert page[1152:1160] == [127, 120, 1, 129, 118, 118, 118, 0]
    assert page[1160:1168] == [139] * 7 + [0]
    assert page[1168:1728] == [0] * 560  # padding to a multiple of 576
    deq = kvf.dequantize_kv_cache_model1(packed)
    assert deq.shape == (1, 2, 1, 512)
    expect = x.float().clone()
    expect[0, 192:256] = -1024.0
    assert torch.equal(deq.reshape(2, 512), expect)


@pytest.mark.parametrize("page", [1, 2, 61])
def test_model1_roundtrip_bound_and_pow2_scales(page):
    x = _spread((2, page, 1, 512), 30 + page, -6.0, 6.0)
    x[1, 0, 0, 64:128] = 0.0
    packed = kvf.quantize_kv_cache_model1(x)
    assert packed.stride()[0] == kvf.model1_page_bytes(page)
    deq = kvf.dequantize_kv_cache_model1(packed)
    _, scale_rec = kvf._model1_regions(packed)
    assert bool((scale_rec[..., 7] == 0).all())  # pad byte
    exps = scale_rec[..., :7].to(torch.int32) - 127  # (2, page, 7)
    scales = torch.pow(2.0, exps.double())
    amax = x.double()[:, :, 0, :448].reshape(2, page, 7, 64).abs().amax(-1)
    assert bool((amax <= 448.0 * scales).all())
    nz = amax > 0
    assert bool((amax[nz] > 224.0 * scales[nz]).all())
    assert bool((exps[~nz] == -126).all())
    _assert_pow2_bound(x[:, :, 0, :448], deq[:, :, 0, :448], scales.repeat_interleave(64, -1))
    assert torch.equal(deq[..., 448:], x[..., 448:].float())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), lo=st.floats(-30.0, 30.0), width=st.floats(0.0, 8.0))
def test_model1_roundtrip_bound_property(seed, lo, width):
    x = _spread((1, 3, 1, 512), seed, lo, lo + width)
    packed = kvf.quantize_kv_cache_model1(x)
    deq = kvf.dequantize_kv_cache_model1(packed)
    _, scale_rec = kvf._model1_regions(packed)
    scales = torch.pow(2.0, scale_rec[..., :7].double() - 127).repeat_interleave(64, -1)
    _assert_pow2_bound(x[:, :, 0, :448], deq[:, :, 0, :448], scales)


def test_model1_strides_writes_and_errors():
    x = _spread((3, 5, 1, 512), 41, -3.0, 3.0)
    ref = kvf.quantize_kv_cache_model1(x)
    want = kvf.dequantize_kv_cache_model1(ref)
    bigger = kvf.quantize_kv_cache_model1(x, page_stride=5 * 584 + 3, dtype=torch.float8_e4m3fn)
    assert bigger.stride()[0] == 5 * 584 + 3 and bigger.dtype == torch.float8_e4m3fn
    assert torch.equal(kvf.dequantize_kv_cache_model1(bigger), want)
    assert torch.equal(kvf.dequantize_sparse_kv_cache(bigger), want)
    # Pages copied into a foreign buffer at an offset.
    pages = ref.as_strided((3, kvf.model1_page_bytes(5)), (kvf.model1_page_bytes(5), 1))
    buf = torch.full((5 + 3 * 4000,), 0xCD, dtype=torch.uint8)
    buf.as_strided((3, pages.shape[1]), (4000, 1), storage_offset=5).copy_(pages)
    view = buf.as_strided((3, 5, 1, 584), (4000, 584, 584, 1), storage_offset=5).view(torch.int8)
    assert torch.equal(kvf.dequantize_kv_cache_model1(view), want)

    cache = kvf.new_kv_cache_model1(3, 5)
    slots = torch.tensor([14, -3, 0, 7, 6])
    new = x.reshape(15, 512)[[14, 2, 0, 7, 6]]
    kvf.write_kv_model1(cache, slots, new)
    got = kvf.dequantize_kv_cache_model1(cache).reshape(15, 512)
    for s in (14, 0, 7, 6):
        assert torch.equal(got[s], want.reshape(15, 512)[s])
    assert torch.equal(got[1], torch.zeros(512))

    with pytest.raises(ValueError):  # token stride is not 584: not a view of whole pages
        kvf.dequantize_kv_cache_model1(torch.zeros(2, 3, 1, 600, dtype=torch.uint8)[..., :584])
    with pytest.raises(ValueError):
        kvf.new_kv_cache_model1(2, 3, page_stride=3 * 584 - 1)
    with pytest.raises(ValueError):
        kvf.quantize_kv_cache_model1(_spread((1, 2, 1, 576), 1))
    with pytest.raises(ValueError):
        kvf.dequantize_sparse_kv_cache(torch.zeros(1, 2, 1, 576, dtype=torch.uint8))


def test_sparse_dispatch_float_and_v32():
    x = _spread((1, 2, 1, 576), 50, -1.0, 1.0)
    assert torch.equal(kvf.dequantize_sparse_kv_cache(x), x.float())
    p = kvf.quantize_kv_cache_v32(x)
    assert torch.equal(kvf.dequantize_sparse_kv_cache(p), kvf.dequantize_kv_cache_v32(p))


# ----------------------------------------------------------------------------------------------
# The same helpers on a GPU (skipped without one)
# ----------------------------------------------------------------------------------------------


@pytest.mark.requires_gpu
def test_cuda_results_match_cpu():
    dev = torch.device("cuda")
    k = _spread((3, 16, 2, 576), 60, -5.0, 5.0)
    k[0, 0, 0, 0] = float("nan")
    k[0, 0, 0, 1] = float("inf")
    mask = torch.rand(3, 16, generator=_gen(61)) < 0.7
    c_fp8, c_desc = kvf.quantize_kv_cache_fp8(k, valid_mask=mask)
    g_fp8, g_desc = kvf.quantize_kv_cache_fp8(k.to(dev), valid_mask=mask.to(dev))
    assert g_desc.device.type == "cuda" and g_desc.item() == c_desc.item()
    assert torch.equal(g_fp8.view(torch.uint8).cpu(), c_fp8.view(torch.uint8))
    # The NaN planted above stays NaN (torch.equal would call NaN != NaN a mismatch).
    torch.testing.assert_close(kvf.dequantize_kv_cache_fp8(g_fp8, g_desc).cpu(),
                               kvf.dequantize_kv_cache_fp8(c_fp8, c_desc), rtol=0, atol=0, equal_nan=True)

    x = _spread((2, 7, 1, 576), 62, -8.0, 8.0)
    x[0, 0, 0, 128:256] = 0.0
    c = kvf.quantize_kv_cache_v32(x, page_stride=8 * 656)
    g = kvf.quantize_kv_cache_v32(x.to(dev), page_stride=8 * 656)
    assert torch.equal(g.cpu(), c)
    assert torch.equal(kvf.dequantize_kv_cache_v32(g).cpu(), kvf.dequantize_kv_cache_v32(c))

    x = _spread((2, 61, 1, 512), 63, -8.0, 8.0)
    c = kvf.quantize_kv_cache_model1(x)
    g = kvf.quantize_kv_cache_model1(x.to(dev))
    assert torch.equal(g.cpu(), c)
    assert torch.equal(kvf.dequantize_kv_cache_model1(g).cpu(), kvf.dequantize_kv_cache_model1(c))
    cache = kvf.new_kv_cache_model1(2, 61, device=dev)
    slots = torch.tensor([0, 60, -1, 100], device=dev)
    kvf.write_kv_model1(cache, slots, x.reshape(122, 512)[[0, 60, 5, 100]].to(dev))
    got = kvf.dequantize_kv_cache_model1(cache).reshape(122, 512).cpu()
    want = kvf.dequantize_kv_cache_model1(c).reshape(122, 512)
    assert torch.equal(got[[0, 60, 100]], want[[0, 60, 100]])
