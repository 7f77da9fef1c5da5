"""GPU correctness of flash_mla_with_kvcache / get_mla_metadata against flash_mla.reference.

Every case poisons what the kernel must not read (see conftest.build_paged_case): NaN in
unused cache slots and pages, junk past each request's pages in block_table, NaN heads around
a sliced q. Outputs are allocated inside the call, so the "no stale memory" check is: every
out value finite, and rows with no visible key exactly out == 0, lse == +inf. The page-size
tests also decode into NaN-filled out= / lse= buffers.

Page sizes: the main matrix runs 64-token pages; a focused matrix ("page sizes" below) runs
every supported page size (16, 32, 64, 128, 256) on every kernel, with lengths at the edges of
the pages and of the kernels' 64-token tiles, and the CUDA-graph and scheduler-object tests
have small-page cases.

The whole module is skipped without a CUDA GPU (checked before importing flash_mla).
"""

from __future__ import annotations

import functools
import math
import random
from typing import NamedTuple, Sequence, Union

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("flash-mla GPU tests need a CUDA GPU", allow_module_level=True)

import flash_mla  # noqa: E402
from flash_mla import (  # noqa: E402
    FlashMLASchedMeta,
    flash_mla_with_kvcache,
    get_mla_metadata,
    host_plan,
)
from flash_mla.reference import mla_decode_reference  # noqa: E402

from conftest import PAGE_SIZES, CaseShape, bits, capture_graph, page_lengths  # noqa: E402  (tests/python is on sys.path)

pytestmark = pytest.mark.requires_gpu

HEAD_DIM_V = 512
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FORCED_KERNELS = ("sm80_large", "sm80_small", "sm90")
ALL_KERNELS = ("auto",) + FORCED_KERNELS


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def expected_parts(rows_per_kv_head: int, h_kv: int) -> int:
    return max(1, num_sms() // (h_kv * -(-rows_per_kv_head // 64)))


def smem_optin_bytes():
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # older torch: the known figures of the sm_80 / sm_90 / sm_100 parts
        if props.major in (9, 10):
            optin = 227 * 1024
        elif (props.major, props.minor) == (8, 0):
            optin = 163 * 1024
        else:
            optin = 99 * 1024
    return optin


@functools.lru_cache(maxsize=None)
def kernel_skip_reason(kernel: str):
    """None if the library can run ``kernel`` on this GPU (its own answer), else why not."""
    try:
        flash_mla.kernel_for_device(kernel=kernel)
    except (RuntimeError, ValueError) as err:
        return f"kernel {kernel!r} does not run on this GPU / build: {err}"
    return None


def runnable_kernels(kernels=ALL_KERNELS):
    return [k for k in kernels if kernel_skip_reason(k) is None]


def metadata(case):
    return get_mla_metadata(case.cache_seqlens, case.rows_per_kv_head, case.h_kv)


def decode(case, meta, splits, causal, kernel="auto", softmax_scale=None, q=None, **kwargs):
    return flash_mla_with_kvcache(q if q is not None else case.q, case.k_cache, case.block_table,
                                  case.cache_seqlens, HEAD_DIM_V, meta, splits,
                                  softmax_scale=softmax_scale, causal=causal, kernel=kernel,
                                  **kwargs)


def reference(case, causal, softmax_scale=None):
    """float64 reference (independent of TF32 settings), returned as float32."""
    return mla_decode_reference(case.q, case.k_cache, case.block_table, case.cache_seqlens,
                                HEAD_DIM_V, softmax_scale, causal, accum_dtype=torch.float64)


class Shape(NamedTuple):
    name: str
    b: int
    s_q: int
    h_q: int
    h_kv: int
    seqlens: Union[str, Sequence[int]]
    q_layout: str = "contiguous"
    k_layout: str = "contiguous"


def build(make_case, shape: Shape, dtype, seed, **kwargs):
    return make_case(shape.b, shape.s_q, shape.h_q, shape.h_kv, shape.seqlens, dtype, seed=seed,
                     q_layout=shape.q_layout, k_layout=shape.k_layout, **kwargs)


# ----------------------------------------------------------------------------------------------
# the correctness matrix (kernel="auto")
# ----------------------------------------------------------------------------------------------

# Lengths: "edge" cycles through 0, 1, 63, 64, 65, 127, 128, 129, 191, ...; "long" has one
# request of >= 8192 tokens (not a multiple of 64); "short" has L < s_q (causal rows with no
# visible key). See conftest.seqlens_for.
MAIN_SHAPES = [
    Shape("b1_sq1_h1_kv1_L4157", 1, 1, 1, 1, [4157]),
    Shape("b1_sq1_h16_kv1_L1", 1, 1, 16, 1, [1], "head_pad"),
    Shape("b2_sq1_h128_kv1_L64_65", 2, 1, 128, 1, [64, 65], "contiguous", "row_pad"),
    Shape("b13_sq1_h16_kv1_edge", 13, 1, 16, 1, "edge", "bhsd"),
    Shape("b13_sq1_h3_kv1_edge", 13, 1, 3, 1, "edge", "head_pad", "head_pad"),
    Shape("b5_sq2_h20_kv2_L0_63_128_9000_1", 5, 2, 20, 2, [0, 63, 128, 9000, 1], "hsbd"),
    Shape("b16_sq2_h64_kv1_mixed", 16, 2, 64, 1, "mixed"),
    Shape("b7_sq4_h72_kv8_edge", 7, 4, 72, 8, "edge", "bhsd", "head_pad"),
    Shape("b9_sq4_h16_kv2_short", 9, 4, 16, 2, "short", "head_pad"),
    Shape("b33_sq1_h100_kv2_mixed", 33, 1, 100, 2, "mixed", "hsbd", "row_pad"),
    Shape("b6_sq8_h16_kv1_edge", 6, 8, 16, 1, "edge"),
    Shape("b24_sq2_h128_kv8_long", 24, 2, 128, 8, "long", "head_pad"),
    Shape("b64_sq1_h64_kv1_mixed", 64, 1, 64, 1, "mixed", "bhsd"),
    Shape("b3_sq4_h128_kv1_long", 3, 4, 128, 1, "long", "contiguous", "head_pad"),
    Shape("b128_sq1_h16_kv1_mixed", 128, 1, 16, 1, "mixed"),
    Shape("b37_sq2_h8_kv8_mixed", 37, 2, 8, 8, "mixed", "hsbd"),
    Shape("b11_sq1_h32_kv2_long", 11, 1, 32, 2, "long", "contiguous", "row_pad"),
]


def _causal_id(causal: bool) -> str:
    return "causal" if causal else "noncausal"


@pytest.mark.parametrize("causal", [False, True], ids=_causal_id)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", MAIN_SHAPES, ids=[s.name for s in MAIN_SHAPES])
def test_decode_matches_reference(shape, dtype, causal, make_case, check_decode, seed):
    case = build(make_case, shape, dtype, seed)
    meta, splits = metadata(case)
    out, lse = decode(case, meta, splits, causal)
    ref_out, ref_lse = reference(case, causal)
    check_decode(out, lse, ref_out, ref_lse, dtype, what=case.describe())


# Every forced path on every shape (bf16 / fp16 alternate; causal for s_q > 1, alternating
# for s_q == 1).
@pytest.mark.parametrize("kernel", FORCED_KERNELS)
@pytest.mark.parametrize("shape", MAIN_SHAPES, ids=[s.name for s in MAIN_SHAPES])
def test_forced_kernel_matches_reference(shape, kernel, make_case, check_decode, seed):
    reason = kernel_skip_reason(kernel)
    if reason:
        pytest.skip(reason)
    index = MAIN_SHAPES.index(shape)
    dtype = torch.bfloat16 if index % 2 == 0 else torch.float16
    causal = shape.s_q > 1 or index % 4 == 1
    case = build(make_case, shape, dtype, seed)
    meta, splits = metadata(case)
    out, lse = decode(case, meta, splits, causal, kernel=kernel)
    ref_out, ref_lse = reference(case, causal)
    check_decode(out, lse, ref_out, ref_lse, dtype, what=f"{kernel} {case.describe()}")


# Large problems: one reference, every kernel path compared with it.
LARGE_CASES = [
    pytest.param(Shape("b128_sq1_h128_kv1_normal8192", 128, 1, 128, 1, "normal:8192"),
                 torch.bfloat16, id="b128_sq1_h128_kv1_normal8192-bf16-causal"),
    pytest.param(Shape("b128_sq2_h16_kv1_normal4096", 128, 2, 16, 1, "normal:4096", "bhsd"),
                 torch.float16, id="b128_sq2_h16_kv1_normal4096-fp16-causal"),
    pytest.param(Shape("b128_sq2_h128_kv1_normal8192", 128, 2, 128, 1, "normal:8192", "head_pad"),
                 torch.bfloat16, id="b128_sq2_h128_kv1_normal8192-bf16-causal"),
    pytest.param(Shape("b32_sq1_h128_kv1_normal32768", 32, 1, 128, 1, "normal:32768"),
                 torch.float16, id="b32_sq1_h128_kv1_normal32768-fp16-causal"),
    pytest.param(Shape("b4_sq4_h16_kv1_imbalanced", 4, 4, 16, 1, [4641, 45118, 1730, 1696]),
                 torch.bfloat16, id="b4_sq4_h16_kv1_imbalanced-bf16-causal"),
]


@pytest.mark.parametrize("shape, dtype", LARGE_CASES)
def test_large_cases_every_kernel(shape, dtype, make_case, check_decode, seed):
    case = build(make_case, shape, dtype, seed)
    ref_out, ref_lse = reference(case, True)
    meta, splits = metadata(case)
    for kernel in runnable_kernels():
        out, lse = decode(case, meta, splits, True, kernel=kernel)
        check_decode(out, lse, ref_out, ref_lse, dtype, what=f"{kernel} {case.describe()}")


@pytest.mark.parametrize("causal", [False, True], ids=_causal_id)
@pytest.mark.parametrize("s_q", [1, 4], ids=lambda s: f"sq{s}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_all_lengths_zero(dtype, s_q, causal, make_case, check_decode, seed):
    case = make_case(5, s_q, 16, 1, "zeros", dtype, seed=seed, q_layout="head_pad")
    meta, splits = metadata(case)
    ref_out, ref_lse = reference(case, causal)
    for kernel in runnable_kernels():
        out, lse = decode(case, meta, splits, causal, kernel=kernel)
        assert (out == 0).all(), kernel
        assert (lse == math.inf).all(), kernel
        check_decode(out, lse, ref_out, ref_lse, dtype, what=kernel)


@pytest.mark.parametrize("softmax_scale", [0.01, 0.2, 1.0 / math.sqrt(576)],
                         ids=["scale0.01_flat", "scale0.2_peaked", "scale_default_explicit"])
def test_softmax_scale(softmax_scale, make_case, check_decode, seed):
    case = make_case(6, 2, 32, 1, "mixed", torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    out, lse = decode(case, meta, splits, True, softmax_scale=softmax_scale)
    ref_out, ref_lse = reference(case, True, softmax_scale=softmax_scale)
    check_decode(out, lse, ref_out, ref_lse, torch.bfloat16, what=f"scale={softmax_scale}")


# ----------------------------------------------------------------------------------------------
# page sizes: 16, 32, 64, 128 and 256 tokens per page
# ----------------------------------------------------------------------------------------------


# Lengths: conftest.page_lengths, i.e. 0, 1, page - 1, page, page + 1, multiples of the page
# that are not multiples of 64 (and the reverse), odd lengths, one request of >= 1,437 tokens
# (up to 94 pages of 16), all in one batch. "page_pad": pages further apart than their size.
PAGE_SHAPES = [
    CaseShape("b8_sq1_h128_kv1", 8, 1, 128, 1, False),
    CaseShape("b16_sq2_h16_kv1_causal", 16, 2, 16, 1, True, "bhsd", "page_pad"),
    CaseShape("b12_sq2_h3_kv1_causal", 12, 2, 3, 1, True, "head_pad", "head_pad"),
    CaseShape("b10_sq1_h24_kv1", 10, 1, 24, 1, False, "hsbd", "row_pad"),
    CaseShape("b6_sq2_h20_kv2_causal", 6, 2, 20, 2, True, "contiguous", "page_pad"),
]


def _nan_outputs(case):
    """NaN-filled out / lse views with one NaN batch entry on each side (16-byte aligned)."""
    out_buf = torch.full((case.b + 2, case.s_q, case.h_q, HEAD_DIM_V), math.nan, dtype=case.dtype,
                         device="cuda")
    lse_buf = torch.full((case.b + 2, case.h_q, case.s_q), math.nan, device="cuda")
    return out_buf, lse_buf


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
@pytest.mark.parametrize("shape", PAGE_SHAPES, ids=[s.name for s in PAGE_SHAPES])
def test_page_sizes_every_kernel(shape, page, dtype, make_case, check_decode, seed):
    """Every page size on every kernel this GPU runs, against one float64 reference: shuffled
    physical pages, NaN in every unused slot (past each length in its last page, in pages no
    request uses, in the padding of the strided layouts), junk block_table entries past each
    request's ceil(L / page) pages. "auto" allocates its outputs; the forced kernels write into
    NaN-filled out= / lse= buffers whose neighbours must stay NaN."""
    lens = page_lengths(page, shape.b, random.Random(seed))
    case = make_case(shape.b, shape.s_q, shape.h_q, shape.h_kv, lens, dtype, seed=seed,
                     q_layout=shape.q_layout, k_layout=shape.k_layout, page=page)
    assert case.page == page
    meta, splits = metadata(case)
    ref_out, ref_lse = reference(case, shape.causal)
    for kernel in runnable_kernels():
        what = f"{kernel} {case.describe()}"
        if kernel == "auto":
            out, lse = decode(case, meta, splits, shape.causal, kernel=kernel)
        else:
            out_buf, lse_buf = _nan_outputs(case)
            out, lse = decode(case, meta, splits, shape.causal, kernel=kernel, out=out_buf[1:-1],
                              lse=lse_buf[1:-1])
            torch.cuda.synchronize()
            assert torch.isnan(out_buf[0].float()).all() and torch.isnan(out_buf[-1].float()).all(), what
            assert torch.isnan(lse_buf[0]).all() and torch.isnan(lse_buf[-1]).all(), what
        check_decode(out, lse, ref_out, ref_lse, dtype, what=what)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_metadata_reused_across_page_sizes(dtype, make_case, check_decode, seed):
    """The plan depends on the lengths and head counts only: one get_mla_metadata serves caches
    of every page size (same lengths, other block tables), each call on another kernel, and is
    what get_mla_metadata returns for every one of those cases."""
    lens = [0, 1, 15, 16, 17, 63, 64, 65, 127, 129, 255, 256, 257, 1000, 1499]
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    meta, splits = get_mla_metadata(seqlens, 2 * 16, 1)
    meta_before, splits_before = meta.clone(), splits.clone()
    kernels = runnable_kernels()
    for i, page in enumerate((16, 256, 32, 128, 64)):
        case = make_case(len(lens), 2, 16, 1, lens, dtype, seed=seed + page, page=page,
                         q_layout="head_pad")
        kernel = kernels[i % len(kernels)]
        out, lse = decode(case, meta, splits, True, kernel=kernel)
        check_decode(out, lse, *reference(case, True), dtype, what=f"page {page} {kernel}")
        assert torch.equal(meta, meta_before) and torch.equal(splits, splits_before)
        own_meta, own_splits = metadata(case)
        assert torch.equal(own_meta, meta) and torch.equal(own_splits, splits), f"page {page}"


@pytest.mark.parametrize("page", [16, 256], ids=["page16", "page256"])
def test_sched_api_with_page_sizes(page, make_case, check_decode, seed):
    """A FlashMLASchedMeta planned on a cache of `page`-token pages serves later layers of that
    page size; a cache of another page size raises ValueError naming page_block_size."""
    case = make_case(9, 2, 32, 1, page_lengths(page, 9, random.Random(seed)), torch.bfloat16,
                     seed=seed, page=page, q_layout="bhsd")
    sched, _ = get_mla_metadata()
    out, lse = decode(case, sched, None, True)
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what="planning call")
    layer = case.with_new_data(seed + 1)
    out, lse = decode(layer, sched, None, True)
    check_decode(out, lse, *reference(layer, True), torch.bfloat16, what="second layer")
    other = make_case(9, 2, 32, 1, case.seqlens, torch.bfloat16, seed=seed + 2)  # 64-token pages
    with pytest.raises(ValueError, match="page_block_size"):
        decode(other, sched, None, True)


# ----------------------------------------------------------------------------------------------
# metadata: reuse across layers, equality with the host plan
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_metadata_reused_across_layers(dtype, make_case, check_decode, seed):
    """One get_mla_metadata per decoding step, reused by every layer (new q and k_cache,
    same cache_seqlens); neither the metadata nor the inputs are modified by the calls."""
    case = make_case(19, 2, 16, 1, "mixed", dtype, seed=seed, q_layout="head_pad")
    meta, splits = metadata(case)
    meta_before, splits_before = meta.clone(), splits.clone()
    kernels = runnable_kernels()
    for layer in range(4):
        layer_case = case if layer == 0 else case.with_new_data(seed + layer)
        kernel = kernels[layer % len(kernels)]
        q_before = bits(layer_case.q).clone()
        k_before = bits(layer_case.k_cache).clone()
        bt_before = layer_case.block_table.clone()
        out, lse = decode(layer_case, meta, splits, True, kernel=kernel)
        ref_out, ref_lse = reference(layer_case, True)
        check_decode(out, lse, ref_out, ref_lse, dtype, what=f"layer {layer} {kernel}")
        assert torch.equal(meta, meta_before) and torch.equal(splits, splits_before)
        assert torch.equal(bits(layer_case.q), q_before), "q was modified"
        assert torch.equal(bits(layer_case.k_cache), k_before), "k_cache was modified"
        assert torch.equal(layer_case.block_table, bt_before), "block_table was modified"


def _seqlens_set(name: str):
    rng = random.Random(name)
    if name == "b1_L0":
        return [0]
    if name == "b1_L100000":
        return [100000]
    if name == "b13_edge":
        return [0, 1, 63, 64, 65, 127, 128, 129, 191, 500, 1000, 2047, 2049]
    if name == "b128_normal8192":
        return [min(max(int(rng.gauss(8192, 4096)), 1), 16384) for _ in range(128)]
    if name == "b300_mostly_zero":
        return [0 if rng.random() < 0.7 else rng.randint(1, 100000) for _ in range(300)]
    if name == "b20000_random":  # more requests than the metadata kernel stages in smem
        return [rng.randint(0, 4000) for _ in range(20000)]
    raise ValueError(name)


SEQLEN_SETS = ["b1_L0", "b1_L100000", "b13_edge", "b128_normal8192", "b300_mostly_zero",
               "b20000_random"]
HEAD_CONFIGS = [(1, 1), (16, 1), (128, 1), (512, 1), (64, 8), (20, 2)]


@pytest.mark.parametrize("rows, h_kv", HEAD_CONFIGS, ids=[f"rows{r}_kv{k}" for r, k in HEAD_CONFIGS])
@pytest.mark.parametrize("lengths", SEQLEN_SETS)
def test_metadata_matches_host_plan(lengths, rows, h_kv):
    seqlens = _seqlens_set(lengths)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    meta, splits = get_mla_metadata(cache_seqlens, rows, h_kv)
    parts = expected_parts(rows, h_kv)
    assert meta.dtype == torch.int32 and splits.dtype == torch.int32
    assert meta.device == cache_seqlens.device and splits.device == cache_seqlens.device
    assert tuple(meta.shape) == (parts, 8)
    assert tuple(splits.shape) == (len(seqlens) + 1,)
    host_meta, host_splits = host_plan(seqlens, rows, h_kv, num_sms())
    assert len(host_meta) == parts
    assert meta.cpu().tolist() == [[int(x) for x in row] for row in host_meta]
    assert splits.cpu().tolist() == [int(x) for x in host_splits]


# ----------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------


def _twin_cases(make_case, seed, b=12, s_q=2, h_q=64, h_kv=1, dtype=torch.bfloat16, page=64):
    """Two cases with identical shapes (batch, pages, table width) and different lengths, so
    that B's tensors can be copied into A's (a graph's static inputs)."""
    rng = random.Random(seed)
    lens_a = [rng.choice([0, 1, 64, 65]) if rng.random() < 0.3 else rng.randint(0, 2500)
              for _ in range(b)]
    lens_b = [rng.choice([0, 1, 63, 129]) if rng.random() < 0.3 else rng.randint(0, 2500)
              for _ in range(b)]
    lens_b[0] = 8193  # one long request in B only: a different plan
    pages = lambda ls: [-(-L // page) for L in ls]  # noqa: E731
    num_blocks = max(sum(pages(lens_a)), sum(pages(lens_b))) + 8
    width = max(pages(lens_a) + pages(lens_b)) + 2
    common = dict(num_blocks=num_blocks, table_width=width, q_layout="head_pad", page=page)
    a = make_case(b, s_q, h_q, h_kv, lens_a, dtype, seed=seed, **common)
    bb = make_case(b, s_q, h_q, h_kv, lens_b, dtype, seed=seed + 1, **common)
    return a, bb


def _load_into(dst, src):
    """Copies every input of src into dst's tensors, in place."""
    dst.q.copy_(src.q)
    dst.k_cache.copy_(src.k_cache)
    dst.block_table.copy_(src.block_table)
    dst.cache_seqlens.copy_(src.cache_seqlens)


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_cuda_graph_decode_with_precomputed_metadata(kernel, make_case, check_decode, seed):
    reason = kernel_skip_reason(kernel)
    if reason:
        pytest.skip(reason)
    case = make_case(8, 2, 64, 1, "mixed", torch.bfloat16, seed=seed, q_layout="bhsd")
    meta, splits = metadata(case)
    graph, (out, lse) = capture_graph(lambda: decode(case, meta, splits, True, kernel=kernel))

    graph.replay()
    torch.cuda.synchronize()
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what="first replay")

    # New contents of q (in place), then of q and k_cache: the replay must see them.
    fresh = case.with_new_data(seed + 1)
    case.q.copy_(fresh.q)
    graph.replay()
    torch.cuda.synchronize()
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what="new q")

    fresh = case.with_new_data(seed + 2)
    case.q.copy_(fresh.q)
    case.k_cache.copy_(fresh.k_cache)
    graph.replay()
    torch.cuda.synchronize()
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what="new q and k_cache")


@pytest.mark.parametrize("causal", [False, True], ids=_causal_id)
def test_cuda_graph_metadata_and_decode(causal, make_case, check_decode, seed):
    """get_mla_metadata and the decode captured together: replays re-plan from the current
    cache_seqlens, so new lengths, block table, q and cache all take effect."""
    a, b = _twin_cases(make_case, seed)
    _check_replanning_graph(a, b, causal, "auto", check_decode, "")


def _check_replanning_graph(a, b, causal, kernel, check_decode, label):
    """Captures get_mla_metadata + decode of case `a`, replays it, loads twin `b`'s lengths,
    block table, q and cache into `a`'s tensors and replays again: the plan must be the host's
    for the new lengths and both replays must match the reference."""

    def step():
        meta, splits = metadata(a)
        return (meta, splits) + tuple(decode(a, meta, splits, causal, kernel=kernel))

    graph, (meta, splits, out, lse) = capture_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    check_decode(out, lse, *reference(a, causal), torch.bfloat16, what=f"{label}replay A")

    _load_into(a, b)
    graph.replay()
    torch.cuda.synchronize()
    host_meta, host_splits = host_plan(b.seqlens, a.rows_per_kv_head, a.h_kv, num_sms())
    assert meta.cpu().tolist() == [[int(x) for x in row] for row in host_meta]
    assert splits.cpu().tolist() == [int(x) for x in host_splits]
    check_decode(out, lse, *reference(a, causal), torch.bfloat16, what=f"{label}replay B")


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_cuda_graph_small_pages(kernel, make_case, check_decode, seed):
    """A 16-token-page cache in a captured step (metadata and decode): replays see new lengths,
    block table, q and cache contents written in place (the twin's are laid out for 16-token
    pages too: 4x as many block_table columns as with 64)."""
    reason = kernel_skip_reason(kernel)
    if reason:
        pytest.skip(reason)
    a, b = _twin_cases(make_case, seed, page=16)
    assert a.page == b.page == 16
    _check_replanning_graph(a, b, True, kernel, check_decode, f"{kernel} ")


def test_cuda_graph_sched_api(make_case, check_decode, seed):
    """Later-FlashMLA usage captured in a graph: a fresh scheduler object planned inside the
    capture (its planning kernel replays too)."""
    a, b = _twin_cases(make_case, seed, h_q=16, s_q=4)

    def step():
        sched, _ = get_mla_metadata()
        return decode(a, sched, None, True)

    graph, (out, lse) = capture_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    check_decode(out, lse, *reference(a, True), torch.bfloat16, what="replay A")
    _load_into(a, b)
    graph.replay()
    torch.cuda.synchronize()
    check_decode(out, lse, *reference(a, True), torch.bfloat16, what="replay B")


# ----------------------------------------------------------------------------------------------
# later-FlashMLA API
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=_causal_id)
def test_sched_api_plans_once_and_reuses(causal, make_case, check_decode, seed):
    case = make_case(10, 2, 32, 2, "edge", torch.float16, seed=seed, q_layout="hsbd")
    sched, placeholder = get_mla_metadata()
    assert placeholder is None
    assert isinstance(sched, FlashMLASchedMeta) and sched.config is None

    out, lse = decode(case, sched, None, causal)
    check_decode(out, lse, *reference(case, causal), torch.float16, what="first call")
    assert sched.config is not None
    meta, splits = metadata(case)
    assert torch.equal(sched.tile_scheduler_metadata, meta)
    assert torch.equal(sched.num_splits, splits)

    planned = (sched.tile_scheduler_metadata, sched.num_splits)
    for layer in (1, 2):
        layer_case = case.with_new_data(seed + layer)
        out, lse = decode(layer_case, sched, None, causal)
        check_decode(out, lse, *reference(layer_case, causal), torch.float16,
                     what=f"layer {layer}")
        assert sched.tile_scheduler_metadata is planned[0] and sched.num_splits is planned[1]


def _changed_call(change, case):
    """Arguments of a call that differs from case's configuration in one respect."""
    q, k, bt, cs, causal = case.q, case.k_cache, case.block_table, case.cache_seqlens, True
    if change == "causal":
        causal = False
    elif change == "s_q":
        q = q[:, :1]
    elif change == "batch":
        q, bt, cs = q[:3], bt[:3], cs[:3]
    elif change == "h_q":
        q = q[:, :, :8]
    elif change == "h_kv":
        k = torch.cat([k, k], dim=2)
    elif change == "page_block_size":
        k = k.reshape(k.shape[0] * 2, 32, k.shape[2], k.shape[3])
    else:
        raise ValueError(change)
    return q, k, bt, cs, causal


@pytest.mark.parametrize("change", ["causal", "s_q", "batch", "h_q", "h_kv", "page_block_size"])
def test_sched_config_change_raises(change, make_case, check_decode, seed):
    case = make_case(4, 2, 16, 1, "mixed", torch.bfloat16, seed=seed)
    sched, _ = get_mla_metadata()
    out, lse = decode(case, sched, None, True)
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what="planning call")

    q, k, bt, cs, causal = _changed_call(change, case)
    with pytest.raises(ValueError, match=change):
        flash_mla_with_kvcache(q, k, bt, cs, HEAD_DIM_V, sched, None, causal=causal)

    # The object still serves its own configuration.
    out, lse = decode(case, sched, None, True)
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what="after the error")


SPARSE_ONLY = ["indices", "attn_sink", "extra_k_cache", "topk_length"]


def _unsupported_value(name, case):
    dev = case.q.device
    return {
        "indices": torch.zeros((case.b, case.s_q, 64), dtype=torch.int32, device=dev),
        "attn_sink": torch.zeros((case.h_q,), dtype=torch.float32, device=dev),
        "extra_k_cache": case.k_cache,
        "topk_length": torch.full((case.b,), 64, dtype=torch.int32, device=dev),
    }[name]


@pytest.mark.parametrize("form", ["seed", "sched"])
@pytest.mark.parametrize("name", SPARSE_ONLY)
def test_sparse_kwargs_on_a_dense_call_raise(name, form, make_case, seed):
    """Token-sparse arguments on a dense call (block_table given): a ValueError naming the
    argument that does not belong (block_table for indices), before any planning or launch."""
    case = make_case(3, 1, 16, 1, [5, 0, 70], torch.bfloat16, seed=seed)
    if form == "seed":
        meta, splits = metadata(case)
    else:
        meta, splits = get_mla_metadata()
    with pytest.raises(ValueError, match="block_table" if name == "indices" else name):
        decode(case, meta, splits, False, **{name: _unsupported_value(name, case)})
    if form == "sched":
        assert meta.config is None, "a rejected call must not plan the scheduler object"


@pytest.mark.parametrize("form", ["seed", "sched"])
def test_default_valued_kwargs_accepted(form, make_case, check_decode, seed):
    case = make_case(3, 2, 16, 1, [5, 0, 700], torch.bfloat16, seed=seed)
    if form == "seed":
        meta, splits = metadata(case)
    else:
        meta, splits = get_mla_metadata()
    out, lse = decode(case, meta, splits, True, is_fp8_kvcache=False, indices=None,
                      attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None,
                      topk_length=None, extra_topk_length=None)
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what=form)


def test_unknown_kwarg_raises_type_error(make_case, seed):
    case = make_case(2, 1, 16, 1, [5, 9], torch.bfloat16, seed=seed)
    meta, splits = metadata(case)
    with pytest.raises(TypeError, match="no_such_option"):
        decode(case, meta, splits, False, no_such_option=1)


# ----------------------------------------------------------------------------------------------
# streams, kernel names
# ----------------------------------------------------------------------------------------------


def test_runs_on_current_stream(make_case, check_decode, seed):
    """Metadata and decode on a side stream, whose inputs are written on that stream after a
    long sleep: work launched on any other stream would read the old q / seqlens."""
    case = make_case(16, 2, 32, 1, "long", torch.bfloat16, seed=seed)
    fresh_q = case.with_new_data(seed + 1).q.clone()
    true_lens = case.cache_seqlens.clone()
    case.cache_seqlens.fill_(1)  # stale values seen by a wrongly-streamed metadata kernel
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs change
        case.q.copy_(fresh_q)
        case.cache_seqlens.copy_(true_lens)
        meta, splits = metadata(case)
        out, lse = decode(case, meta, splits, True)
    side.synchronize()
    torch.cuda.synchronize()

    host_meta, host_splits = host_plan(case.seqlens, case.rows_per_kv_head, case.h_kv, num_sms())
    assert meta.cpu().tolist() == [[int(x) for x in row] for row in host_meta]
    assert splits.cpu().tolist() == [int(x) for x in host_splits]
    check_decode(out, lse, *reference(case, True), torch.bfloat16, what="side stream")


def test_kernel_for_device_names():
    names = {k: flash_mla.kernel_for_device(kernel=k) for k in runnable_kernels()}
    for kernel, name in names.items():
        assert isinstance(name, str) and name, kernel
    forced = {k: v for k, v in names.items() if k != "auto"}
    assert len(set(forced.values())) == len(forced), f"forced kernels share names: {forced}"
    assert names["auto"] in forced.values(), f"auto resolves to {names['auto']!r}, not in {forced}"
    assert flash_mla.kernel_for_device() == names["auto"]
    device = torch.device("cuda", torch.cuda.current_device())
    assert flash_mla.kernel_for_device(device) == names["auto"]


def test_expected_kernels_run_here():
    """The portable kernels run on every sm_80+ GPU (the large one where its ~149 KB of shared
    memory fit), the Hopper kernel on sm_90, where it is also the automatic choice."""
    major, _ = torch.cuda.get_device_capability()
    assert kernel_skip_reason("sm80_small") is None
    if smem_optin_bytes() >= 150 * 1024:
        assert kernel_skip_reason("sm80_large") is None
    if major == 9:
        assert kernel_skip_reason("sm90") is None
        assert flash_mla.kernel_for_device(kernel="auto") == flash_mla.kernel_for_device(kernel="sm90")
    else:
        assert kernel_skip_reason("sm90") is not None


# ----------------------------------------------------------------------------------------------
# unaligned strides (kept last: a kernel fault here would poison the CUDA context)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["q", "k_cache"])
def test_unaligned_strides_work_or_raise_clearly(which, make_case, check_decode, seed):
    """Strides other than the last are arbitrary in the contract; ones that are not multiples
    of 8 elements (16 bytes) may be refused, but only with an exception naming the argument,
    never with a fault or a wrong result."""
    case = make_case(3, 2, 16, 1, [100, 0, 700], torch.bfloat16, seed=seed)
    q, k = case.q, case.k_cache
    nan = float("nan")
    if which == "q":
        base = torch.full((case.b, case.s_q, case.h_q, 577), nan, dtype=q.dtype, device=q.device)
        q = base[..., 1:]
        q.copy_(case.q)
    else:
        base = torch.full((case.num_blocks, 64, case.h_kv, 577), nan, dtype=k.dtype,
                          device=k.device)
        k = base[..., 1:]
        k.copy_(case.k_cache)
    meta, splits = metadata(case)
    ref_out, ref_lse = mla_decode_reference(q, k, case.block_table, case.cache_seqlens,
                                            HEAD_DIM_V, None, True, accum_dtype=torch.float64)
    for kernel in runnable_kernels():
        try:
            out, lse = flash_mla_with_kvcache(q, k, case.block_table, case.cache_seqlens,
                                              HEAD_DIM_V, meta, splits, causal=True,
                                              kernel=kernel)
        except (ValueError, RuntimeError) as err:
            assert which in str(err), f"{kernel}: the error does not name {which}: {err}"
            continue
        torch.cuda.synchronize()
        check_decode(out, lse, ref_out, ref_lse, torch.bfloat16, what=f"{kernel} unaligned {which}")
