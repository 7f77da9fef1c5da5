"""CPU tests of flash_mla.sparse_reference.sparse_decode_reference against a brute-force float64
loop written independently (plain Python floats, one (request, token, head) at a time), on
tiny shapes that cover every rule of token-sparse decoding: negative and too-large indices,
duplicates, topk_length 0 / partial / full, a second cache with another page size, rows with
no valid key, finite and +-inf attention sinks; plus NaN in every slot no valid index selects,
agreement with the dense reference, and full-size checks over both dequantized FP8 formats.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flash_mla import kv_formats as kvf
from flash_mla import sparse_reference as sref


sparse_decode_reference = sref.sparse_decode_reference

INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1


# ----------------------------------------------------------------------------------------------
# The brute-force oracle
# ----------------------------------------------------------------------------------------------


def brute_force(q, caches, attn_sink, scale, dv):
    """caches: list of (kv (nb, page, 1, d), indices (b, s_q, topk), topk_length or None).
    Returns out (b, s_q, h_q, dv) and lse (b, h_q, s_q) as float64 tensors."""
    b, s_q, h_q, d = q.shape
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        for t in range(s_q):
            keys = []
            for kv, idx, tl in caches:
                nb, page = kv.shape[0], kv.shape[1]
                n = idx.shape[2] if tl is None else min(max(int(tl[i]), 0), idx.shape[2])
                for r in range(n):
                    token = int(idx[i, t, r])
                    if 0 <= token < nb * page:
                        keys.append([float(v) for v in kv[token // page, token % page, 0]])
            if not keys:
                continue
            for h in range(h_q):
                qv = [float(v) for v in q[i, t, h]]
                scores = [scale * math.fsum(a * c for a, c in zip(qv, key)) for key in keys]
                m = max(scores)
                row_lse = m + math.log(math.fsum(math.exp(s - m) for s in scores))
                probs = [math.exp(s - row_lse) for s in scores]
                factor = 1.0
                if attn_sink is not None:
                    z = float(attn_sink[h]) - row_lse
                    factor = 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))
                for c in range(dv):
                    out[i, t, h, c] = factor * math.fsum(p * key[c] for p, key in zip(probs, keys))
                lse[i, h, t] = row_lse
    return out, lse


def _tiny_case(seed, *, d=8, b=3, s_q=2, h_q=3, nb=4, page=3, topk=7, extra=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, h_q, d, generator=g, dtype=torch.float64)
    kv = torch.randn(nb, page, 1, d, generator=g, dtype=torch.float64)
    cap = nb * page
    pool = [INT_MIN, -7, -1, cap, cap + 5, INT_MAX]
    idx = torch.randint(0, cap, (b, s_q, topk), generator=g)
    bad = torch.rand(b, s_q, topk, generator=g) < 0.3
    fill = torch.tensor(pool)[torch.randint(0, len(pool), (b, s_q, topk), generator=g)]
    idx = torch.where(bad, fill, idx)
    idx[0, 0, 1] = idx[0, 0, 0] = 4 % cap  # a duplicate
    if b > 1 and s_q > 1:
        idx[1, 1, :] = -1  # a row with no valid key in the main cache
    case = dict(q=q, kv=kv, indices=idx.to(torch.int32))
    if extra:
        e_nb, e_page, e_topk = 3, 5, 4
        e_cap = e_nb * e_page
        ekv = torch.randn(e_nb, e_page, 1, d, generator=g, dtype=torch.float64)
        eidx = torch.randint(-2, e_cap + 2, (b, s_q, e_topk), generator=g)
        if b > 1 and s_q > 1:
            eidx[1, 1, :] = torch.tensor([e_cap, -1, INT_MAX, INT_MIN])  # (1, 1): no key at all
        eidx[b - 1, 0, :2] = 7  # duplicate in the extra cache
        case.update(extra_kv=ekv, extra_indices=eidx.to(torch.int32))
    return case


def _check(case, *, topk_length=None, extra_topk_length=None, attn_sink=None, scale=None,
           dv=4, tol=1e-12):
    d = case["q"].shape[-1]
    scale_used = (1.0 / math.sqrt(d)) if scale is None else scale
    caches = [(case["kv"], case["indices"], topk_length)]
    if "extra_kv" in case:
        caches.append((case["extra_kv"], case["extra_indices"], extra_topk_length))
    want_out, want_lse = brute_force(case["q"], caches, attn_sink, scale_used, dv)
    out, lse = sparse_decode_reference(
        case["q"], case["kv"], case["indices"], topk_length=topk_length, attn_sink=attn_sink,
        extra_kv=case.get("extra_kv"), extra_indices=case.get("extra_indices"),
        extra_topk_length=extra_topk_length, softmax_scale=scale, head_dim_v=dv,
        accum_dtype=torch.float64)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse.float()))
    torch.testing.assert_close(out.double(), want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Rules, one by one and combined
# ----------------------------------------------------------------------------------------------


def test_single_cache_invalid_and_duplicate_indices():
    case = _tiny_case(1, extra=False)
    out, lse = _check(case)
    # Request 1, token 1 has no valid index: out 0, lse +inf, for every head.
    assert bool((out[1, 1] == 0).all()) and bool(torch.isinf(lse[1, :, 1]).all())
    assert bool((lse[1, :, 1] > 0).all())


def test_duplicates_count_as_often_as_they_appear():
    case = _tiny_case(2, extra=False, b=1, s_q=1, topk=3)
    case["indices"][:] = torch.tensor([5, 5, 9], dtype=torch.int32)
    out2, lse2 = _check(case)
    case["indices"][:] = torch.tensor([5, 9, -1], dtype=torch.int32)
    out1, lse1 = _check(case)
    assert not torch.allclose(out1, out2)
    # Two copies of key 5: its weight doubles, i.e. lse grows by log(1 + p5) > 0.
    assert bool((lse2 > lse1).all())


@pytest.mark.parametrize("lengths", [[0, 0, 0], [7, 7, 7], [0, 3, 9], [-2, 1, 7]])
def test_topk_length(lengths):
    case = _tiny_case(3, extra=False)
    tl = torch.tensor(lengths, dtype=torch.int32)
    out, lse = _check(case, topk_length=tl)
    if lengths == [0, 0, 0]:
        assert bool((out == 0).all()) and bool(torch.isinf(lse).all())
    if lengths == [7, 7, 7]:
        out_full, lse_full = sparse_decode_reference(case["q"], case["kv"], case["indices"],
                                                     head_dim_v=4, accum_dtype=torch.float64)
        assert torch.equal(out, out_full) and torch.equal(lse, lse_full)


def test_two_caches_with_different_pages():
    case = _tiny_case(4)
    out, lse = _check(case, topk_length=torch.tensor([2, 7, 0], dtype=torch.int32),
                      extra_topk_length=torch.tensor([4, 1, 3], dtype=torch.int32))
    # The extra cache alone keeps request 2 alive (its main topk_length is 0).
    assert bool(torch.isfinite(lse[2]).all())
    # Request 1 token 1: no valid key in either cache.
    assert bool((out[1, 1] == 0).all()) and bool(torch.isinf(lse[1, :, 1]).all())
    # Extra tokens join the same softmax: dropping them changes the result.
    out_main, _ = sparse_decode_reference(case["q"], case["kv"], case["indices"], head_dim_v=4,
                                          topk_length=torch.tensor([2, 7, 0]))
    assert not torch.allclose(out_main[0], out[0])


def test_extra_cache_with_zero_length_equals_main_only():
    case = _tiny_case(5)
    out, lse = _check(case, extra_topk_length=torch.zeros(3, dtype=torch.int32))
    out_m, lse_m = sparse_decode_reference(case["q"], case["kv"], case["indices"], head_dim_v=4,
                                           accum_dtype=torch.float64)
    assert torch.equal(out, out_m) and torch.equal(lse, lse_m)


@pytest.mark.parametrize("sinks", [[0.5, -1.0, 3.0], [math.inf, -math.inf, 0.0],
                                   [math.inf, math.inf, math.inf], [-math.inf] * 3, [1e4, -1e4, 20.0]])
def test_attention_sink(sinks):
    case = _tiny_case(6)
    sink = torch.tensor(sinks, dtype=torch.float32)
    out, lse = _check(case, attn_sink=sink, topk_length=torch.tensor([7, 7, 2]))
    out0, lse0 = sparse_decode_reference(case["q"], case["kv"], case["indices"],
                                         extra_kv=case["extra_kv"], extra_indices=case["extra_indices"],
                                         topk_length=torch.tensor([7, 7, 2]), head_dim_v=4,
                                         accum_dtype=torch.float64)
    assert torch.equal(lse, lse0), "lse is returned without the sink"
    for h, s in enumerate(sinks):
        if s == math.inf:
            assert bool((out[:, :, h] == 0).all())
        if s == -math.inf:
            assert torch.equal(out[:, :, h], out0[:, :, h])
    assert bool((out[1, 1] == 0).all()) and bool(torch.isinf(lse[1, :, 1]).all())
    assert not bool(torch.isnan(out).any())


def test_softmax_scale_and_head_dim_v():
    case = _tiny_case(7)
    _check(case, scale=0.37, dv=8)
    _check(case, scale=2.0, dv=1)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), h_q=st.integers(1, 5), s_q=st.integers(1, 3),
       page=st.integers(1, 6), extra=st.booleans(), with_sink=st.booleans(),
       with_len=st.booleans())
def test_random_cases_against_brute_force(seed, h_q, s_q, page, extra, with_sink, with_len):
    case = _tiny_case(seed, h_q=h_q, s_q=s_q, page=page, extra=extra, b=2)
    g = torch.Generator().manual_seed(seed + 1)
    tl = torch.randint(0, 9, (2,), generator=g) if with_len else None
    etl = torch.randint(0, 5, (2,), generator=g) if (with_len and extra) else None
    sink = torch.randn(h_q, generator=g) if with_sink else None
    _check(case, topk_length=tl, extra_topk_length=etl, attn_sink=sink)


# ----------------------------------------------------------------------------------------------
# Unselected slots are never read
# ----------------------------------------------------------------------------------------------


def _selected(kv, idx, tl):
    nb, page = kv.shape[:2]
    sel = torch.zeros(nb * page, dtype=torch.bool)
    for i in range(idx.shape[0]):
        n = idx.shape[2] if tl is None else min(max(int(tl[i]), 0), idx.shape[2])
        row = idx[i, :, :n].reshape(-1).long()
        row = row[(row >= 0) & (row < nb * page)]
        sel[row] = True
    return sel.reshape(nb, page)


def test_nan_in_unselected_slots_changes_nothing():
    case = _tiny_case(8, d=16, h_q=4)
    tl = torch.tensor([3, 7, 5])
    etl = torch.tensor([2, 4, 1])
    sink = torch.tensor([0.1, math.inf, -math.inf, -2.0])
    kwargs = dict(topk_length=tl, extra_topk_length=etl, attn_sink=sink, head_dim_v=12)
    ref_out, ref_lse = sparse_decode_reference(case["q"], case["kv"], case["indices"],
                                               extra_kv=case["extra_kv"],
                                               extra_indices=case["extra_indices"], **kwargs)
    kv = case["kv"].clone()
    ekv = case["extra_kv"].clone()
    sel = _selected(kv, case["indices"], tl)
    esel = _selected(ekv, case["extra_indices"], etl)
    assert not bool(sel.all()) and not bool(esel.all())
    kv[~sel] = math.nan
    ekv[~esel] = math.nan
    out, lse = sparse_decode_reference(case["q"], kv, case["indices"], extra_kv=ekv,
                                       extra_indices=case["extra_indices"], **kwargs)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert not bool(torch.isnan(out).any()) and not bool(torch.isnan(lse).any())


# ----------------------------------------------------------------------------------------------
# Full-size checks: the dense reference, both dequantized FP8 formats, float32 accuracy
# ----------------------------------------------------------------------------------------------


def test_matches_dense_reference_when_indices_list_every_token():
    from flash_mla.reference import mla_decode_reference

    g = torch.Generator().manual_seed(9)
    b, s_q, h_q, d, page, nb = 2, 2, 3, 576, 16, 5
    q = torch.randn(b, s_q, h_q, d, generator=g)
    kv = torch.randn(nb, page, 1, d, generator=g)
    block_table = torch.tensor([[3, 1, 4], [0, 2, 2]], dtype=torch.int32)
    seqlens = torch.tensor([40, 7], dtype=torch.int32)
    topk = 48
    idx = torch.full((b, s_q, topk), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(int(seqlens[i])):
            idx[i, :, j] = block_table[i, j // page] * page + j % page
    out, lse = sparse_decode_reference(q, kv, idx, accum_dtype=torch.float64)
    want_out, want_lse = mla_decode_reference(q, kv, block_table, seqlens, 512,
                                              accum_dtype=torch.float64)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_full_size_over_dequantized_fp8(fmt):
    g = torch.Generator().manual_seed(10)
    d = 576 if fmt == "v32" else 512
    b, s_q, h_q, nb, page, topk = 2, 1, 5, 3, 61 if fmt == "model1" else 64, 32
    q = torch.randn(b, s_q, h_q, d, generator=g).to(torch.bfloat16)
    kv = torch.randn(nb, page, 1, d, generator=g).to(torch.bfloat16)
    packed = (kvf.quantize_kv_cache_v32(kv) if fmt == "v32" else kvf.quantize_kv_cache_model1(kv))
    deq = kvf.dequantize_sparse_kv_cache(packed)
    idx = torch.randint(-1, nb * page, (b, s_q, topk), generator=g, dtype=torch.int32)
    sink = torch.tensor([0.0, 1.0, -1.0, math.inf, -math.inf])
    out32, lse32 = sparse_decode_reference(q, deq, idx, attn_sink=sink)
    out64, lse64 = sparse_decode_reference(q, deq, idx, attn_sink=sink, accum_dtype=torch.float64)
    assert out32.shape == (b, s_q, h_q, 512) and lse32.shape == (b, h_q, s_q)
    torch.testing.assert_close(out32, out64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse32, lse64, rtol=2e-6, atol=2e-6)
    assert bool((out32[:, :, 3] == 0).all())
    # FP8 keys stay close to the bf16 keys they came from (not a bound, a sanity check).
    out_bf, _ = sparse_decode_reference(q, kv, idx, attn_sink=sink)
    assert (out_bf - out32).abs().max().item() < 0.1


def test_argument_errors():
    case = _tiny_case(11)
    q, kv, idx = case["q"], case["kv"], case["indices"]
    with pytest.raises(TypeError):
        sparse_decode_reference(q, kv.to(torch.float8_e4m3fn), idx, head_dim_v=4)
    with pytest.raises(TypeError):
        sparse_decode_reference(q, kv, idx.float(), head_dim_v=4)
    with pytest.raises(ValueError):
        sparse_decode_reference(q, kv[..., :4], idx, head_dim_v=4)
    with pytest.raises(ValueError):
        sparse_decode_reference(q, kv, idx[:, :1], head_dim_v=4)
    with pytest.raises(ValueError):
        sparse_decode_reference(q, kv, idx, head_dim_v=9)
    with pytest.raises(ValueError):
        sparse_decode_reference(q, kv, idx, head_dim_v=4, extra_kv=case["extra_kv"])
    with pytest.raises(ValueError):
        sparse_decode_reference(q, kv, idx, head_dim_v=4, attn_sink=torch.zeros(2))
    with pytest.raises(ValueError):
        sparse_decode_reference(q, kv, idx, head_dim_v=4, topk_length=torch.zeros(2, dtype=torch.int32))


@pytest.mark.requires_gpu
def test_cuda_matches_cpu():
    case = _tiny_case(12, d=32, h_q=6)
    sink = torch.tensor([0.3, math.inf, -math.inf, 1.0, -2.0, 0.0])
    kwargs = dict(topk_length=torch.tensor([3, 7, 5]), extra_topk_length=torch.tensor([4, 2, 0]),
                  attn_sink=sink, head_dim_v=24, accum_dtype=torch.float64)
    c_out, c_lse = sparse_decode_reference(case["q"], case["kv"], case["indices"],
                                           extra_kv=case["extra_kv"],
                                           extra_indices=case["extra_indices"], **kwargs)
    dev = torch.device("cuda")
    moved = {k: v.to(dev) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    g_out, g_lse = sparse_decode_reference(
        case["q"].to(dev), case["kv"].to(dev), case["indices"].to(dev),
        extra_kv=case["extra_kv"].to(dev), extra_indices=case["extra_indices"].to(dev),
        head_dim_v=24, accum_dtype=torch.float64, **moved)
    assert g_out.device.type == "cuda" and g_lse.device.type == "cuda"
    torch.testing.assert_close(g_out.cpu(), c_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_lse.cpu(), c_lse, rtol=1e-6, atol=1e-6)
