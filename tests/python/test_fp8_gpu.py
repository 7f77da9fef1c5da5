"""GPU correctness of the dense FP8 KV cache: a float8_e4m3fn ``k_cache`` with a float32
``descale_k`` of shape (1,), and optionally a float8_e4m3fn ``q`` with its ``descale_q``.

Cases are conftest.build_paged_case problems (NaN in unused slots and pages, junk past each
request's pages in block_table, strided layouts) put into the FP8 format by
conftest.quantize_case_fp8: the library's quantizers, the strided layouts kept in one-byte
elements, and a NaN code (0x7f or 0xff) in every unused cache slot and padding byte.

Two comparisons per result, with different purposes:

* against flash_mla.reference (float64) on the dequantized inputs, ``float(k_fp8) * descale_k``
  (and ``float(q_fp8) * descale_q``): conftest.assert_decode_matches with the tolerances of the
  output dtype. The e4m3 values are exact in bf16 and fp16, so the kernel rounds exactly where
  the 16-bit path does (P and out to 16 bits) and must meet the same bounds;
* against the kernel's own result on the 16-bit cache (and 16-bit q) the FP8 data came from:
  the quantization error, with the looser bounds of FP8_VS_16BIT below. This catches a kernel
  and a reference that agree on a wrong reading of the format (a scale applied twice, ignored,
  inverted).

Kernels: every kernel takes FP8 ("auto", "sm90" on Hopper, "sm80_large", "sm80_small").

The whole module is skipped without a CUDA GPU (checked before importing flash_mla).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("flash-mla GPU tests need a CUDA GPU", allow_module_level=True)

import flash_mla  # noqa: E402
from flash_mla import flash_mla_with_kvcache, get_mla_metadata, ops  # noqa: E402
from flash_mla.kv_formats import quantize_q_fp8  # noqa: E402
from flash_mla.reference import mla_decode_reference  # noqa: E402

from conftest import (  # noqa: E402  (tests/python is on sys.path)
    CaseShape,
    FP8,
    FP8_NAN_CODES,
    PAGE_SIZES,
    assert_bitwise_equal,
    capture_graph,
    page_lengths,
    quantize_case_fp8,
)

pytestmark = pytest.mark.requires_gpu

DV = 512
FP8_KERNELS = ("auto", "sm90", "sm80_large", "sm80_small")
Q_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": FP8}
Q_NAMES = tuple(Q_DTYPES)

# Bounds of the FP8 result against the result on the 16-bit data it was quantized from.
# e4m3 keeps 3 mantissa bits: a value moves by at most 2**-4 of itself, by ~2.5 % RMS. On
# randn data (conftest's cases) that gives a relative error of out of ~0.03 over the whole
# tensor, up to ~0.08 on single rows of 512 values (1-3 visible keys average nothing away)
# with an FP8 q as well, and lse errors up to ~0.18 where one or two scores set the lse
# (measured with the float reference over ~10,000 rows of these shapes). The bounds leave a
# factor of 2 or more: they catch a wrong reading of the format, not the rounding.
FP8_VS_16BIT = dict(rel=0.1, row_rel=0.2, lse_atol=0.5)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def kernel_skip_reason(kernel: str):
    """None if the library can run ``kernel`` on this GPU (its own answer), else why not."""
    try:
        flash_mla.kernel_for_device(kernel=kernel)
    except (RuntimeError, ValueError) as err:
        return f"kernel {kernel!r} does not run on this GPU / build: {err}"
    return None


def fp8_kernels():
    return [k for k in FP8_KERNELS if kernel_skip_reason(k) is None]


def is_hopper() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


def build(make_case, b, s_q, h_q, h_kv, lens, q_name, seed, **kwargs):
    """A paged case in the FP8 format: an fp16 base for q_name "fp16", else bf16; q
    quantized too for "fp8"."""
    base_dtype = torch.float16 if q_name == "fp16" else torch.bfloat16
    case = make_case(b, s_q, h_q, h_kv, lens, base_dtype, seed=seed, **kwargs)
    return quantize_case_fp8(case, fp8_q=q_name == "fp8", seed=seed)


def metadata(f):
    return get_mla_metadata(f.cache_seqlens, f.rows_per_kv_head, f.h_kv)


def decode(f, meta, splits, causal, kernel="auto", **kwargs):
    """The FP8 call: f's q, FP8 cache and descales."""
    return flash_mla_with_kvcache(f.q, f.k_cache, f.block_table, f.cache_seqlens, DV, meta, splits,
                                  causal=causal, kernel=kernel, **f.descales(), **kwargs)


def decode_16bit(f, meta, splits, causal, kernel="auto"):
    """The same problem on the 16-bit q and cache the FP8 data came from."""
    base = f.base
    return flash_mla_with_kvcache(base.q, base.k_cache, base.block_table, base.cache_seqlens, DV, meta,
                                  splits, causal=causal, kernel=kernel)


def reference(f, causal):
    """float64 reference on the dequantized inputs (the current descales), as float32."""
    q, k = f.reference_inputs()
    return mla_decode_reference(q, k, f.block_table, f.cache_seqlens, DV, None, causal,
                                accum_dtype=torch.float64)


def assert_close_to_16bit(out, lse, out16, lse16, what: str) -> None:
    """FP8 result against the 16-bit one, within FP8_VS_16BIT: relative Frobenius error of out
    (whole tensor, and every row that sees a key) and absolute lse error. Rows with no visible
    key are left to the reference check (exactly 0 / +inf in both)."""
    tag = f"[{what}] "
    seen = torch.isfinite(lse16)  # (b, h_q, s_q)
    assert torch.equal(seen, torch.isfinite(lse)), f"{tag}lse finite in one result only"
    if not seen.any():
        return
    rows = seen.permute(0, 2, 1)  # (b, s_q, h_q)
    o, r = out.float(), out16.float()
    diff = o - r
    rel = (diff.norm() / r.norm()).item()
    assert rel <= FP8_VS_16BIT["rel"], f"{tag}out relative error vs 16-bit {rel:.3g} > {FP8_VS_16BIT['rel']}"
    row_rel = (diff.norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-30)).masked_fill(~rows, 0)
    worst = row_rel.max().item()
    assert worst <= FP8_VS_16BIT["row_rel"], (
        f"{tag}row (b, t, h) = {(row_rel == row_rel.max()).nonzero()[0].tolist()}: relative error vs "
        f"16-bit {worst:.3g} > {FP8_VS_16BIT['row_rel']}")
    lse_err = (lse - lse16).abs().masked_fill(~seen, 0).max().item()
    assert lse_err <= FP8_VS_16BIT["lse_atol"], f"{tag}lse error vs 16-bit {lse_err:.3g} > {FP8_VS_16BIT['lse_atol']}"


def _nan_outputs(f):
    """NaN-filled out / lse buffers with one batch entry on each side (views [1:-1] are the
    outputs, 16-byte aligned)."""
    out_buf = torch.full((f.b + 2, f.s_q, f.h_q, DV), math.nan, dtype=f.out_dtype, device="cuda")
    lse_buf = torch.full((f.b + 2, f.h_q, f.s_q), math.nan, device="cuda")
    return out_buf, lse_buf


def _check_full(f, causal, kernel, meta, splits, ref, check_decode, label=""):
    """One kernel on an FP8 case: against the reference (outputs allocated, and again into
    NaN-filled out= / lse= whose neighbours must stay NaN), then against the 16-bit result of
    the same kernel choice."""
    what = f"{label}{kernel} {f.describe()}"
    out, lse = decode(f, meta, splits, causal, kernel=kernel)
    check_decode(out, lse, *ref, f.out_dtype, what=what)
    out_buf, lse_buf = _nan_outputs(f)
    o2, l2 = decode(f, meta, splits, causal, kernel=kernel, out=out_buf[1:-1], lse=lse_buf[1:-1])
    torch.cuda.synchronize()
    assert torch.isnan(out_buf[0].float()).all() and torch.isnan(out_buf[-1].float()).all(), what
    assert torch.isnan(lse_buf[0]).all() and torch.isnan(lse_buf[-1]).all(), what
    assert_bitwise_equal(o2, out, f"{what}: out= vs allocated")
    assert_bitwise_equal(l2, lse, f"{what}: lse= vs allocated")
    out16, lse16 = decode_16bit(f, meta, splits, causal, kernel=kernel)
    assert_close_to_16bit(out, lse, out16, lse16, what)


# ----------------------------------------------------------------------------------------------
# the correctness matrix: page sizes x shapes, each with one q dtype
# ----------------------------------------------------------------------------------------------


# h_q 1, 3 (odd), 16 and 128; h_kv 2 (GQA) twice; s_q 2 causal (rows with no visible key where
# L < 2) and s_q 1; strided q and caches (in one-byte elements, padding holding NaN codes).
FP8_SHAPES = [
    CaseShape("b8_sq1_h128_kv1", 8, 1, 128, 1, False),
    CaseShape("b12_sq2_h3_kv1_causal", 12, 2, 3, 1, True, "head_pad", "head_pad"),
    CaseShape("b10_sq1_h1_kv1", 10, 1, 1, 1, False, "contiguous", "row_pad"),
    CaseShape("b6_sq2_h16_kv2_causal", 6, 2, 16, 2, True, "bhsd", "page_pad"),
    CaseShape("b9_sq2_h128_kv2_causal", 9, 2, 128, 2, True, "hsbd"),
]


def _matrix():
    """Every (shape, page size) pair once, the q dtype cycling with (shape + page) index: each
    page size and each shape meets every q dtype, in 25 cases instead of 75."""
    params = []
    for i, shape in enumerate(FP8_SHAPES):
        for j, page in enumerate(PAGE_SIZES):
            q_name = Q_NAMES[(i + j) % len(Q_NAMES)]
            params.append(pytest.param(shape, page, q_name, id=f"{shape.name}-page{page}-q_{q_name}"))
    return params


@pytest.mark.parametrize("shape, page, q_name", _matrix())
def test_fp8_matches_reference(shape, page, q_name, make_case, check_decode, seed):
    """Every FP8 kernel on one case: lengths at the edges of the pages and of the 64-token
    tiles (conftest.page_lengths: 0, 1, page - 1, page, page + 1, ..., one of >= 1,437 tokens),
    against the float64 reference on the dequantized inputs (out in q's dtype, bf16 for an FP8
    q; rows with no key exactly 0 / +inf; everything else finite) and against the 16-bit
    result."""
    lens = page_lengths(page, shape.b, random.Random(seed))
    f = build(make_case, shape.b, shape.s_q, shape.h_q, shape.h_kv, lens, q_name, seed, page=page,
              q_layout=shape.q_layout, k_layout=shape.k_layout)
    assert f.page == page and f.k_cache.dtype == FP8 and (f.q.dtype == FP8) == (q_name == "fp8")
    meta, splits = metadata(f)
    ref = reference(f, shape.causal)
    for kernel in fp8_kernels():
        _check_full(f, shape.causal, kernel, meta, splits, ref, check_decode)


# Larger problems: split requests (one of >= 8192 tokens, or lengths around 4096) and the
# combine kernel, every FP8 kernel against one reference.
LARGE = [
    pytest.param(32, 2, 128, 1, "long", "bf16", 64, id="b32_sq2_h128_kv1_long-q_bf16-page64"),
    pytest.param(64, 1, 16, 1, "normal:4096", "fp8", 16, id="b64_sq1_h16_kv1_normal4096-q_fp8-page16"),
    pytest.param(16, 4, 64, 2, "long", "fp16", 256, id="b16_sq4_h64_kv2_long-q_fp16-page256"),
    pytest.param(24, 2, 128, 1, "mixed", "fp8", 128, id="b24_sq2_h128_kv1_mixed-q_fp8-page128"),
]


@pytest.mark.parametrize("b, s_q, h_q, h_kv, lens, q_name, page", LARGE)
def test_fp8_large_cases(b, s_q, h_q, h_kv, lens, q_name, page, make_case, check_decode, seed):
    f = build(make_case, b, s_q, h_q, h_kv, lens, q_name, seed, page=page)
    meta, splits = metadata(f)
    ref = reference(f, True)
    for kernel in fp8_kernels():
        _check_full(f, True, kernel, meta, splits, ref, check_decode, label="large ")


@pytest.mark.parametrize("q_name", Q_NAMES)
def test_fp8_all_lengths_zero(q_name, make_case, check_decode, seed):
    f = build(make_case, 5, 2, 16, 1, "zeros", q_name, seed, page=32)
    meta, splits = metadata(f)
    ref = reference(f, True)
    for kernel in fp8_kernels():
        out, lse = decode(f, meta, splits, True, kernel=kernel)
        assert (out == 0).all() and (lse == math.inf).all(), kernel
        check_decode(out, lse, *ref, f.out_dtype, what=kernel)


@pytest.mark.parametrize("q_name", Q_NAMES)
def test_fp8_every_code(q_name, make_case, check_decode, seed):
    """Every finite e4m3 code (all bytes but 0x7f / 0xff: subnormals, -0, +-448) in the used
    slots, with descale_k = 2**-5. Requests of one key give out = V of that key: each code
    times 2**-5 is exact in bf16 and fp16, so those rows must be exact; the other rows go
    through the usual check. With an FP8 q, q's codes are every finite code too."""
    lens = [1] * 48 + [2, 3, 17, 64, 65, 200]
    f = build(make_case, len(lens), 1, 2, 1, lens, q_name, seed, page=16)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    finite = torch.tensor([c for c in range(256) if c not in FP8_NAN_CODES], dtype=torch.uint8, device="cuda")

    def random_codes(n):
        return finite[torch.randint(0, finite.numel(), (n,), generator=gen, device="cuda")]

    used = ~f.unused
    k_bytes = f.k_cache.view(torch.uint8)
    n_used = int(used.sum())
    k_bytes[used] = random_codes(n_used * f.h_kv * 576).view(n_used, f.h_kv, 576)
    f.descale_k.fill_(2.0 ** -5)
    if f.fp8_q:
        # |q| <= 448 * 2**-12 keeps the scores O(1) against keys of up to 14.
        f.q.view(torch.uint8).copy_(random_codes(f.q.numel()).view(f.q.shape))
        f.descale_q.fill_(2.0 ** -12)
    else:
        f.q.mul_(2.0 ** -8)  # randn * 2**-8 against keys of up to 14: scores O(1)
    seen = set(k_bytes[used].flatten().tolist())
    assert len(seen) == 254, f"{254 - len(seen)} finite codes missing from the cache"

    meta, splits = metadata(f)
    ref_out, ref_lse = reference(f, False)
    one_key = torch.tensor([L == 1 for L in lens], device="cuda")
    for kernel in fp8_kernels():
        out, lse = decode(f, meta, splits, False, kernel=kernel)
        check_decode(out, lse, ref_out, ref_lse, f.out_dtype, what=f"{kernel} every code")
        exact = out[one_key].float() == ref_out[one_key]
        if not exact.all():
            idx = (~exact).nonzero()[0].tolist()
            raise AssertionError(f"{kernel}: one-key row (request, t, h, c) = {idx} of the one-key requests: "
                                 f"{out[one_key][tuple(idx)].item()} != {ref_out[one_key][tuple(idx)].item()}")


# ----------------------------------------------------------------------------------------------
# kernel choice
# ----------------------------------------------------------------------------------------------


def test_fp8_auto_runs_the_expected_kernel(make_case, seed):
    """kernel="auto" with an FP8 cache gives, bit for bit, what the forced kernel it resolves to
    gives (sm90 on Hopper, as for a 16-bit cache)."""
    f = build(make_case, 7, 2, 32, 1, "mixed", "bf16", seed, page=64)
    meta, splits = metadata(f)
    auto_name = flash_mla.kernel_for_device(kernel="auto")
    forced = {k: flash_mla.kernel_for_device(kernel=k)
              for k in ("sm80_large", "sm80_small", "sm90") if kernel_skip_reason(k) is None}
    expected = next(k for k, name in forced.items() if name == auto_name)
    out, lse = decode(f, meta, splits, True, kernel="auto")
    out_x, lse_x = decode(f, meta, splits, True, kernel=expected)
    assert_bitwise_equal(out, out_x, f"auto vs {expected} out")
    assert_bitwise_equal(lse, lse_x, f"auto vs {expected} lse")


def test_fp8_is_fp8_kvcache_with_uint8_bytes(make_case, seed):
    """is_fp8_kvcache=True with the cache as uint8 bytes (how engines allocate it) decodes the
    same bits as the float8_e4m3fn view of those bytes."""
    f = build(make_case, 5, 2, 16, 1, "mixed", "fp8", seed, page=32, k_layout="page_pad")
    meta, splits = metadata(f)
    want_out, want_lse = decode(f, meta, splits, True)
    out, lse = flash_mla_with_kvcache(f.q, f.k_cache.view(torch.uint8), f.block_table, f.cache_seqlens, DV, meta,
                                      splits, causal=True, is_fp8_kvcache=True, **f.descales())
    assert_bitwise_equal(out, want_out, "uint8 cache out")
    assert_bitwise_equal(lse, want_lse, "uint8 cache lse")


# ----------------------------------------------------------------------------------------------
# CUDA graphs: the descales are read on the GPU at every replay
# ----------------------------------------------------------------------------------------------


def _fresh_q(f, seed):
    """Writes new q contents into f.q in place (for an FP8 q: a new quantization, its descale
    copied into f.descale_q); returns nothing."""
    fresh = f.base.with_new_data(seed)
    if f.fp8_q:
        q_fp8, descale_q = quantize_q_fp8(fresh.q)
        f.q.view(torch.uint8).copy_(q_fp8.view(torch.uint8))
        f.descale_q.copy_(descale_q)
    else:
        f.q.copy_(fresh.q)


@pytest.mark.parametrize("q_name", ["bf16", "fp8"])
@pytest.mark.parametrize("kernel", FP8_KERNELS)
def test_fp8_cuda_graph_reads_descales_at_replay(kernel, q_name, make_case, check_decode, seed):
    """One FP8 decode captured; replays after changing, in place, descale_k (x2), then
    descale_q (x0.5, FP8 q), then q's contents: each replay matches the reference of the
    values at replay time."""
    reason = kernel_skip_reason(kernel)
    if reason:
        pytest.skip(reason)
    f = build(make_case, 8, 2, 64, 1, "mixed", q_name, seed, page=32, q_layout="head_pad")
    meta, splits = metadata(f)
    graph, (out, lse) = capture_graph(lambda: decode(f, meta, splits, True, kernel=kernel))

    def replay_and_check(what):
        graph.replay()
        torch.cuda.synchronize()
        check_decode(out, lse, *reference(f, True), f.out_dtype, what=f"{kernel} {what}")

    replay_and_check("first replay")
    first_out = out.clone()
    f.descale_k.mul_(2)
    replay_and_check("descale_k x2")
    assert not torch.equal(out, first_out), "the replay ignored the new descale_k"
    if f.fp8_q:
        f.descale_q.mul_(0.5)
        replay_and_check("descale_q x0.5")
    _fresh_q(f, seed + 1)
    replay_and_check("new q")


def test_fp8_cuda_graph_metadata_and_layers(make_case, check_decode, seed):
    """A decoding step in one graph: metadata planned inside, then three layers, each with its
    own FP8 cache and descale_k (FP8 q, its own descale_q); a replay after new descales and
    new q contents for every layer matches the references."""
    f0 = build(make_case, 6, 2, 16, 1, "long", "fp8", seed, page=64)
    layers = [f0] + [quantize_case_fp8(f0.base.with_new_data(seed + i), fp8_q=True, seed=seed + i)
                     for i in (1, 2)]

    def step():
        meta, splits = metadata(f0)
        return [decode(f, meta, splits, True) for f in layers]

    graph, results = capture_graph(step)
    for round_ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for i, (f, (out, lse)) in enumerate(zip(layers, results)):
            check_decode(out, lse, *reference(f, True), torch.bfloat16, what=f"round {round_} layer {i}")
        for i, f in enumerate(layers):
            f.descale_k.mul_(0.75 + 0.5 * i)
            _fresh_q(f, seed + 10 + i)


def test_fp8_call_does_not_synchronize(make_case, check_decode, seed):
    """The descales stay on the GPU: no torch-level host synchronisation during the call
    (torch.cuda's sync debug mode turns one into an error)."""
    f = build(make_case, 4, 2, 16, 1, [100, 0, 4097, 65], "fp8", seed)
    meta, splits = metadata(f)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = decode(f, meta, splits, True)
        out_small, lse_small = decode(f, meta, splits, True, kernel="sm80_small")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ref = reference(f, True)
    check_decode(out, lse, *ref, f.out_dtype, what="auto")
    check_decode(out_small, lse_small, *ref, f.out_dtype, what="sm80_small")


# ----------------------------------------------------------------------------------------------
# torch.compile and the custom op
# ----------------------------------------------------------------------------------------------


def _step(q, k_cache, block_table, cache_seqlens, descale_k, descale_q):
    """A model step: metadata, then one FP8 decode."""
    meta, splits = get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2], k_cache.shape[2])
    return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits, causal=True,
                                  descale_q=descale_q, descale_k=descale_k)


def _step_out(q, k_cache, block_table, cache_seqlens, descale_k, descale_q, out, lse):
    """The same into out= / lse= (the mutating custom op)."""
    meta, splits = get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2], k_cache.shape[2])
    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits, causal=True,
                           descale_q=descale_q, descale_k=descale_k, out=out, lse=lse)
    return out.float().sum()


def _compile_params():
    params = [pytest.param("aot_eager", "bf16", id="aot_eager-q_bf16"),
              pytest.param("aot_eager", "fp8", id="aot_eager-q_fp8"),
              pytest.param("eager", "fp16", id="eager-q_fp16")]
    skip = [] if importlib.util.find_spec("triton") is not None else [pytest.mark.skip(reason="inductor needs triton")]
    params.append(pytest.param("inductor", "fp8", id="inductor-q_fp8", marks=skip))
    return params


@pytest.mark.parametrize("backend, q_name", _compile_params())
def test_fp8_compile_fullgraph(backend, q_name, make_case, check_decode, seed):
    """torch.compile(fullgraph=True) of a step passing descale_k (and descale_q): matches the
    reference and, bit for bit, eager; a new descale_k value (same tensor) is used by the
    compiled step without recompiling; out= / lse= under compile too."""
    torch._dynamo.reset()
    f = build(make_case, 6, 2, 32, 1, "mixed", q_name, seed, page=16, q_layout="head_pad")
    args = (f.q, f.k_cache, f.block_table, f.cache_seqlens, f.descale_k, f.descale_q)
    compiled = torch.compile(_step, backend=backend, fullgraph=True)
    out, lse = compiled(*args)
    # A descale is data, not a constant of the graph: a new value must not recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for attempt in range(2):
            if attempt:
                f.descale_k.mul_(1.5)
                out, lse = compiled(*args)
            eager_out, eager_lse = _step(*args)
            check_decode(out, lse, *reference(f, True), f.out_dtype, what=f"{backend} call {attempt}")
            assert_bitwise_equal(out, eager_out, f"{backend} out vs eager")
            assert_bitwise_equal(lse, eager_lse, f"{backend} lse vs eager")
    out_buf, lse_buf = _nan_outputs(f)
    compiled_out = torch.compile(_step_out, backend=backend, fullgraph=True)
    total = compiled_out(*args, out_buf[1:-1], lse_buf[1:-1])
    check_decode(out_buf[1:-1], lse_buf[1:-1], *reference(f, True), f.out_dtype, what=f"{backend} out=")
    assert torch.isnan(out_buf[0].float()).all() and torch.isnan(lse_buf[-1]).all()
    assert torch.isfinite(total)
    torch._dynamo.reset()


def test_fp8_opcheck_custom_op(make_case, seed):
    """torch.library.opcheck of the decode op with the descales (schema, fake implementation,
    dispatch), arguments passed by name."""
    op = torch.ops.flash_mla.mla_decode.default
    names = [a.name for a in op._schema.arguments]
    assert "descale_k" in names and "descale_q" in names, names
    f = build(make_case, 3, 2, 16, 1, [70, 0, 700], "fp8", seed)
    meta, splits = metadata(f)
    values = dict(q=f.q, k_cache=f.k_cache, block_table=f.block_table, cache_seqlens=f.cache_seqlens,
                  head_dim_v=DV, tile_scheduler_metadata=meta, num_splits=splits,
                  softmax_scale=1.0 / math.sqrt(576), causal=True, kernel=0, descale_q=f.descale_q,
                  descale_k=f.descale_k)
    missing = [n for n in names if n not in values]
    assert not missing, f"op arguments this test does not know: {missing}"
    # test_schema is left out: its aliasing check multiplies the inputs, and torch has no
    # elementwise kernels for float8_e4m3fn (the FP8-free schema check runs in test_framework_gpu).
    torch.library.opcheck(op, (), {n: values[n] for n in names},
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------------------------
# errors found on the GPU side
# ----------------------------------------------------------------------------------------------


def test_fp8_descale_on_another_device(make_case, seed):
    """A descale on the CPU (or another GPU) while q is on the GPU: ValueError naming it, before
    any launch."""
    f = build(make_case, 3, 1, 16, 1, [70, 0, 300], "fp8", seed)
    meta, splits = metadata(f)
    out_buf, lse_buf = _nan_outputs(f)
    kw = dict(out=out_buf[1:-1], lse=lse_buf[1:-1])
    others = [torch.device("cpu")]
    if torch.cuda.device_count() > 1:
        others.append(torch.device("cuda", (torch.cuda.current_device() + 1) % torch.cuda.device_count()))
    for dev in others:
        with pytest.raises(ValueError, match="descale_k"):
            flash_mla_with_kvcache(f.q, f.k_cache, f.block_table, f.cache_seqlens, DV, meta, splits,
                                   descale_q=f.descale_q, descale_k=f.descale_k.to(dev), **kw)
        with pytest.raises(ValueError, match="descale_q"):
            flash_mla_with_kvcache(f.q, f.k_cache, f.block_table, f.cache_seqlens, DV, meta, splits,
                                   descale_q=f.descale_q.to(dev), descale_k=f.descale_k, **kw)
    torch.cuda.synchronize()
    assert torch.isnan(out_buf.float()).all() and torch.isnan(lse_buf).all(), "a refused call wrote out / lse"


def test_fp8_check_inputs(make_case, check_decode, seed):
    """check_inputs=True with an FP8 cache: valid inputs (junk table tails, NaN codes past each
    length) decode as usual; a bad page id among the used entries is refused, naming it."""
    f = build(make_case, 4, 2, 16, 1, [100, 0, 700, 65], "fp8", seed, page=16)
    meta, splits = metadata(f)
    out, lse = decode(f, meta, splits, True, check_inputs=True)
    check_decode(out, lse, *reference(f, True), f.out_dtype, what="check_inputs")
    bad = f.block_table.clone()
    bad[2, 3] = f.num_blocks
    with pytest.raises(ValueError, match=r"block_table\[2, 3\]"):
        flash_mla_with_kvcache(f.q, f.k_cache, bad, f.cache_seqlens, DV, meta, splits, causal=True,
                               check_inputs=True, **f.descales())


def test_fp8_bad_arguments_on_gpu(make_case, seed):
    """The argument checks with CUDA tensors (the CPU tests cover them in full): exception type
    and the argument named."""
    f = build(make_case, 3, 1, 16, 1, [70, 0, 300], "fp8", seed)
    g = build(make_case, 3, 1, 16, 1, [70, 0, 300], "bf16", seed)
    meta, splits = metadata(f)
    ones = lambda dtype=torch.float32, shape=(1,): torch.ones(shape, dtype=dtype, device="cuda")  # noqa: E731
    out_of = lambda dtype: torch.empty((3, 1, 16, DV), dtype=dtype, device="cuda")  # noqa: E731
    bad = [
        (f.q, f.k_cache, dict(descale_q=f.descale_q), ValueError, "descale_k"),
        (f.q, f.k_cache, dict(descale_k=f.descale_k), ValueError, "descale_q"),
        (g.q, g.base.k_cache, dict(descale_k=ones()), ValueError, "descale_k"),
        (g.base.q, g.base.k_cache, dict(descale_q=ones()), ValueError, "descale_q"),
        (g.q, g.k_cache, dict(descale_k=ones(torch.float16)), TypeError, "descale_k"),
        (g.q, g.k_cache, dict(descale_k=ones(shape=())), ValueError, "descale_k"),
        (g.q, g.k_cache, dict(descale_k=ones(shape=(2,))), ValueError, "descale_k"),
        (f.q, f.k_cache, dict(descale_k=f.descale_k, descale_q=ones(torch.float64)), TypeError, "descale_q"),
        (f.q, f.k_cache, dict(descale_k=f.descale_k, descale_q=ones(shape=(1, 1))), ValueError, "descale_q"),
        (f.q, g.base.k_cache, dict(descale_q=f.descale_q), TypeError, "k_cache"),
        (f.q, f.k_cache, dict(f.descales(), out=out_of(torch.float16)), TypeError, "out"),
        (f.q, f.k_cache, dict(f.descales(), out=out_of(FP8)), TypeError, "out"),
        (g.q, g.k_cache, dict(g.descales(), out=out_of(torch.float16)), TypeError, "out"),
    ]
    for q, k, kwargs, exc, name in bad:
        with pytest.raises(exc, match=name):
            flash_mla_with_kvcache(q, k, f.block_table, f.cache_seqlens, DV, meta, splits, **kwargs)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# flash_mla.ops (DLPack)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_name, page", [("bf16", 16), ("fp16", 64), ("fp8", 256), ("fp8", 32)],
                         ids=["q_bf16-page16", "q_fp16-page64", "q_fp8-page256", "q_fp8-page32"])
def test_fp8_ops_decode_matches_torch_api(q_name, page, make_case, seed):
    """ops.mla_decode with the descales (torch tensors through DLPack, the torch API's
    metadata, NaN-filled outputs and workspace) gives the torch API's bits, on every FP8
    kernel."""
    lens = page_lengths(page, 7, random.Random(seed))
    f = build(make_case, 7, 2, 16, 1, lens, q_name, seed, page=page, k_layout="page_pad")
    meta, splits = metadata(f)
    shapes = ops.workspace_shapes(f.b, f.s_q, f.h_q, f.h_kv, meta.shape[0])
    stream = torch.cuda.current_stream()
    for kernel in fp8_kernels():
        want_out, want_lse = decode(f, meta, splits, True, kernel=kernel)
        out = torch.full(shapes["out"], math.nan, dtype=f.out_dtype, device="cuda")
        lse = torch.full(shapes["lse"], math.nan, device="cuda")
        o_accum = torch.full(shapes["o_accum"], math.nan, device="cuda")
        lse_accum = torch.full(shapes["lse_accum"], math.nan, device="cuda")
        r_out, r_lse = ops.mla_decode(f.q, f.k_cache, f.block_table, f.cache_seqlens, meta, splits, out, lse,
                                      o_accum, lse_accum, causal=True, stream=stream, kernel=kernel,
                                      **f.descales())
        assert r_out is out and r_lse is lse
        torch.cuda.synchronize()
        assert_bitwise_equal(out, want_out, f"ops {kernel} out")
        assert_bitwise_equal(lse, want_lse, f"ops {kernel} lse")


def test_fp8_ops_decode_errors(make_case, seed):
    """ops.mla_decode checks the descales as the torch API does."""
    f = build(make_case, 2, 1, 16, 1, [70, 5], "fp8", seed)
    meta, splits = metadata(f)
    shapes = ops.workspace_shapes(f.b, f.s_q, f.h_q, f.h_kv, meta.shape[0])
    bufs = [torch.empty(shapes["out"], dtype=torch.bfloat16, device="cuda"),
            torch.empty(shapes["lse"], device="cuda"), torch.empty(shapes["o_accum"], device="cuda"),
            torch.empty(shapes["lse_accum"], device="cuda")]
    args = (f.q, f.k_cache, f.block_table, f.cache_seqlens, meta, splits, *bufs)
    with pytest.raises(ValueError, match="descale_k"):
        ops.mla_decode(*args, descale_q=f.descale_q)
    with pytest.raises(ValueError, match="descale_q"):
        ops.mla_decode(*args, descale_k=f.descale_k)
    with pytest.raises(ValueError, match="descale_k"):
        ops.mla_decode(*args, descale_q=f.descale_q, descale_k=f.descale_k.cpu())
    with pytest.raises(TypeError, match="descale_k"):
        ops.mla_decode(*args, descale_q=f.descale_q, descale_k=f.descale_k.double())
    fp16_out = torch.empty(shapes["out"], dtype=torch.float16, device="cuda")
    with pytest.raises(TypeError, match="out"):
        ops.mla_decode(*args[:6], fp16_out, *bufs[1:], **f.descales())
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_name", ["bf16", "fp8"])
@pytest.mark.parametrize("kernel", FP8_KERNELS)
def test_fp8_repeated_calls_bitwise_identical(kernel, q_name, make_case, seed):
    reason = kernel_skip_reason(kernel)
    if reason:
        pytest.skip(reason)
    # One long request split over many SM parts (the combine path) and short ones.
    f = build(make_case, 6, 2, 64, 1, [9000, 3, 0, 700, 4097, 64], q_name, seed, page=64)
    meta, splits = metadata(f)
    first_out, first_lse = decode(f, meta, splits, True, kernel=kernel)
    out_buf, lse_buf = torch.empty_like(first_out), torch.empty_like(first_lse)
    for i in range(3):
        out, lse = decode(f, meta, splits, True, kernel=kernel)
        assert_bitwise_equal(out, first_out, f"{kernel} out, call {i}")
        assert_bitwise_equal(lse, first_lse, f"{kernel} lse, call {i}")
        decode(f, meta, splits, True, kernel=kernel, out=out_buf, lse=lse_buf)
        assert_bitwise_equal(out_buf, first_out, f"{kernel} out=, call {i}")
        assert_bitwise_equal(lse_buf, first_lse, f"{kernel} lse=, call {i}")
