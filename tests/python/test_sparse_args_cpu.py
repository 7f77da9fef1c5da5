"""Argument checking of token-sparse decode (``indices`` given), without a GPU (needs only the
compiled module).

The call is FlashMLA's later-release positional form with a scheduler object::

    sched, _ = get_mla_metadata()
    flash_mla_with_kvcache(q, k_cache, None, None, 512, sched, None, softmax_scale, False,
                           is_fp8_kvcache, indices, attn_sink, extra_k_cache,
                           extra_indices_in_kvcache, topk_length, extra_topk_length)

* q: (b, s_q, h_q, d_qk) bfloat16, last dim contiguous; d_qk 576 (V3.2 FP8 format, bf16 cache of
  576) or 512 (512-dim FP8 format, bf16 cache of 512); any h_q >= 1, s_q >= 1.
* k_cache: bfloat16 (num_blocks, page, 1, d_qk) with is_fp8_kvcache=False; with
  is_fp8_kvcache=True one-byte (uint8 / int8 / float8_e4m3fn) (num_blocks, page, 1, 656) (V3.2)
  or (num_blocks, page, 1, 584) (512-dim), padded page strides allowed; any page size >= 1.
* indices / extra_indices_in_kvcache: int32 (b, s_q, topk); any values (invalid ones are skipped
  on the GPU, never refused on the host). topk_length / extra_topk_length: int32 (b,), any values.
  attn_sink: float32 (h_q,), +-inf allowed. The second cache: same format as the first, its own
  num_blocks and page size; it and its indices come together.
* block_table and cache_seqlens None, head_dim_v 512, causal False; kernel "auto",
  "sm80_large" or "sm80_small"; "sm90" with the V3.2 format and 576-channel bf16 caches only.

Conventions, as for dense decode (test_args_cpu.py, test_fp8_args_cpu.py): a wrong dtype ->
TypeError, a wrong shape / value / missing companion -> ValueError, each naming the argument,
all before any launch and before the device check; arguments that are right in every respect
but the device (CPU tensors here) -> ValueError mentioning CUDA. A refused call leaves the
scheduler object unplanned. (Reusing a planned scheduler object for another configuration needs
the GPU to plan: test_sparse_gpu.py.)
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

import flash_mla
from flash_mla import get_mla_metadata
from flash_mla import kv_formats as kvf

DV = 512
CUDA = r"(?i)cuda"
BF16, FP16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
U8, I8, I16, I32, I64 = torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64
FP8 = torch.float8_e4m3fn
INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1

D_QK = {"bf16_576": 576, "bf16_512": 512, "v32": 576, "model1": 512}
FP8_FORMATS = ("v32", "model1")

# The argument names, as whole words: "q" (also "h_q" / "s_q" / "q.shape"), "indices" but not
# "extra_indices_in_kvcache", "k_cache" but not "extra_k_cache", "topk_length" but not
# "extra_topk_length".
Q = r"(?<![A-Za-z])q(?![A-Za-z])"
INDICES = r"(?<!extra_)indices"
K = r"(?<!extra_)k_cache"
TOPK_LENGTH = r"(?<!extra_)topk_length"

# The positional order of later FlashMLA releases (their tests call it positionally).
SPARSE_ORDER = ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata",
                "num_splits", "softmax_scale", "causal", "is_fp8_kvcache", "indices", "attn_sink",
                "extra_k_cache", "extra_indices_in_kvcache", "topk_length", "extra_topk_length")


def cache_of(fmt, num_blocks, page, *, byte_dtype=U8, pad=False):
    """A zero cache of ``fmt``; ``pad``: pages further apart than they need to be."""
    if fmt.startswith("bf16"):
        d = D_QK[fmt]
        if pad:
            return torch.zeros((num_blocks, page + 3, 1, d), dtype=BF16)[:, 1:page + 1]
        return torch.zeros((num_blocks, page, 1, d), dtype=BF16)
    if fmt == "v32":
        stride = page * kvf.V32_BYTES_PER_TOKEN + (1024 if pad else 0)
        return kvf.new_kv_cache_v32(num_blocks, page, page_stride=stride, dtype=byte_dtype)
    stride = kvf.model1_page_bytes(page) + (2 * kvf.MODEL1_PAGE_ALIGN if pad else 0)
    return kvf.new_kv_cache_model1(num_blocks, page, page_stride=stride, dtype=byte_dtype)


def token_indices(b, s_q, topk, capacity):
    """int32 (b, s_q, topk): valid tokens, the last entry of each row -1 (when topk > 1)."""
    idx = (torch.arange(b * s_q * topk) % capacity).to(I32).view(b, s_q, topk)
    if topk > 1:
        idx[..., -1] = -1
    return idx


def sparse_args(fmt="v32", *, b=2, s_q=1, h_q=16, topk=64, page=64, num_blocks=4, byte_dtype=U8, pad=False,
                extra=None, topk_length=False, extra_topk_length=False, sink=False):
    """Token-sparse arguments, right in every respect but the device (all on the CPU), keyed by
    SPARSE_ORDER. ``extra``: (page, num_blocks, topk) of a second cache of the same format (the
    other padding than the first's)."""
    d = D_QK[fmt]
    args = dict(
        q=torch.zeros((b, s_q, h_q, d), dtype=BF16),
        k_cache=cache_of(fmt, num_blocks, page, byte_dtype=byte_dtype, pad=pad),
        block_table=None,
        cache_seqlens=None,
        head_dim_v=DV,
        tile_scheduler_metadata=get_mla_metadata()[0],
        num_splits=None,
        softmax_scale=1.0 / math.sqrt(d),
        causal=False,
        is_fp8_kvcache=fmt in FP8_FORMATS,
        indices=token_indices(b, s_q, topk, num_blocks * page),
        attn_sink=torch.zeros((h_q,), dtype=F32) if sink else None,
        extra_k_cache=None,
        extra_indices_in_kvcache=None,
        topk_length=torch.full((b,), topk, dtype=I32) if topk_length else None,
        extra_topk_length=None,
    )
    if extra is not None:
        e_page, e_blocks, e_topk = extra
        args["extra_k_cache"] = cache_of(fmt, e_blocks, e_page, byte_dtype=byte_dtype, pad=not pad)
        args["extra_indices_in_kvcache"] = token_indices(b, s_q, e_topk, e_blocks * e_page)
        if extra_topk_length:
            args["extra_topk_length"] = torch.full((b,), e_topk, dtype=I32)
    return args


def call_sparse(args, **kwargs):
    """flash_mla_with_kvcache on ``args``, every argument positional in SPARSE_ORDER."""
    return flash_mla.flash_mla_with_kvcache(*(args[name] for name in SPARSE_ORDER), **kwargs)


def zeros(shape, dtype):
    """A change of an argument to zeros of ``shape`` / ``dtype`` (made when applied)."""
    return lambda args: torch.zeros(shape, dtype=dtype)


def apply(args, changes):
    for name, value in changes.items():
        args[name] = value(args) if callable(value) else value
    return args


def _assert_reaches_device_check(info):
    msg = str(info.value)
    assert re.search(CUDA, msg), f"expected the device check (a message mentioning CUDA), got: {msg}"


def _assert_argument_error(info, exc):
    """A dtype / shape / value complaint, not the device one (which mentions CUDA)."""
    if exc is ValueError:
        assert not re.search(CUDA, str(info.value)), f"the device check came first: {info.value}"


def _assert_unplanned(args):
    sched = args["tile_scheduler_metadata"]
    assert sched.config is None and sched.tile_scheduler_metadata is None, \
        f"a refused call planned the scheduler object: {sched!r}"


def test_positional_order_of_later_flashmla():
    """The 16 positional parameters in later FlashMLA's order; out, lse and kernel keyword-only."""
    params = inspect.signature(flash_mla.flash_mla_with_kvcache).parameters
    assert tuple(params)[:len(SPARSE_ORDER)] == SPARSE_ORDER
    for name in ("out", "lse", "kernel"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert params["kernel"].default == "auto"


# ----------------------------------------------------------------------------------------------
# accepted: only the device check fails
# ----------------------------------------------------------------------------------------------

# name: (sparse_args keywords, changes to the arguments, call keywords)
ACCEPTED = {
    # formats, byte dtypes, padded pages
    "v32": (dict(), dict(), dict()),
    "model1": (dict(fmt="model1"), dict(), dict()),
    "bf16_576": (dict(fmt="bf16_576"), dict(), dict()),
    "bf16_512": (dict(fmt="bf16_512"), dict(), dict()),
    "v32_int8": (dict(byte_dtype=I8), dict(), dict()),
    "v32_fp8_bytes": (dict(byte_dtype=FP8), dict(), dict()),
    "model1_int8": (dict(fmt="model1", byte_dtype=I8), dict(), dict()),
    "model1_fp8_bytes": (dict(fmt="model1", byte_dtype=FP8), dict(), dict()),
    "v32_padded_pages": (dict(pad=True), dict(), dict()),
    "model1_padded_pages": (dict(fmt="model1", pad=True), dict(), dict()),
    "bf16_576_padded_pages": (dict(fmt="bf16_576", pad=True), dict(), dict()),
    # page sizes (any >= 1)
    "v32_page1": (dict(page=1, num_blocks=64), dict(), dict()),
    "model1_page2": (dict(fmt="model1", page=2, num_blocks=40), dict(), dict()),
    "bf16_512_page61": (dict(fmt="bf16_512", page=61), dict(), dict()),
    "v32_page69": (dict(page=69), dict(), dict()),
    "model1_page576": (dict(fmt="model1", page=576, num_blocks=2), dict(), dict()),
    "bf16_576_page256": (dict(fmt="bf16_576", page=256, num_blocks=2), dict(), dict()),
    # shapes
    "h_q1": (dict(h_q=1), dict(), dict()),
    "h_q3_s_q4": (dict(fmt="model1", h_q=3, s_q=4), dict(), dict()),
    "h_q33_s_q2": (dict(fmt="bf16_576", h_q=33, s_q=2), dict(), dict()),
    "h_q128_s_q2": (dict(h_q=128, s_q=2), dict(), dict()),
    "b1": (dict(b=1), dict(), dict()),
    "topk1": (dict(topk=1), dict(), dict()),
    "topk7": (dict(fmt="model1", topk=7), dict(), dict()),
    "topk2048": (dict(topk=2048), dict(), dict()),
    "topk16384": (dict(fmt="bf16_512", b=1, topk=16384), dict(), dict()),
    "q_head_slice": (dict(), dict(q=lambda a: torch.zeros((2, 1, 18, 576), dtype=BF16)[:, :, 1:17]), dict()),
    # values are the GPU's business: junk indices, out-of-range lengths, infinite sinks
    "junk_index_values": (dict(), dict(indices=lambda a: torch.tensor(
        [-1, -2, INT_MIN, INT_MAX, 256, 255, 0, 2 ** 30], dtype=I32).repeat(16).view(2, 1, 64)), dict()),
    "topk_length_out_of_range": (dict(), dict(topk_length=lambda a: torch.tensor([-3, 64 + 5], dtype=I32)), dict()),
    "topk_length_zeros": (dict(), dict(topk_length=zeros((2,), I32)), dict()),
    "attn_sink_infinite": (dict(), dict(attn_sink=lambda a: torch.tensor([math.inf, -math.inf] * 8, dtype=F32)),
                           dict()),
    # optional arguments
    "topk_length": (dict(topk_length=True), dict(), dict()),
    "attn_sink": (dict(sink=True), dict(), dict()),
    "extra_cache": (dict(extra=(2, 3, 7)), dict(), dict()),
    "extra_cache_with_lengths": (dict(extra=(61, 2, 100), extra_topk_length=True), dict(), dict()),
    "extra_cache_bf16_512": (dict(fmt="bf16_512", extra=(69, 2, 64)), dict(), dict()),
    "everything_model1": (dict(fmt="model1", h_q=33, s_q=2, page=61, pad=True, byte_dtype=I8, extra=(1, 100, 7),
                               topk_length=True, extra_topk_length=True, sink=True), dict(), dict()),
    "everything_bf16_576": (dict(fmt="bf16_576", h_q=3, s_q=4, page=2, num_blocks=40, extra=(576, 1, 64),
                                 topk_length=True, extra_topk_length=True, sink=True), dict(), dict()),
    # scalars and keywords
    "softmax_scale": (dict(), dict(softmax_scale=0.1), dict()),
    "softmax_scale_none": (dict(fmt="model1"), dict(softmax_scale=None), dict()),
    "kernel_auto": (dict(), dict(), dict(kernel="auto")),
    "kernel_sm80_large": (dict(sink=True), dict(), dict(kernel="sm80_large")),
    "kernel_sm80_small": (dict(fmt="model1", extra=(2, 3, 7)), dict(), dict(kernel="sm80_small")),
    "out_and_lse": (dict(), dict(), dict(out=torch.zeros((2, 1, 16, DV), dtype=BF16),
                                         lse=torch.zeros((2, 16, 1), dtype=F32))),
}


@pytest.mark.parametrize("make, changes, kwargs", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_sparse_arguments_reach_device_check(make, changes, kwargs):
    args = apply(sparse_args(**make), changes)
    with pytest.raises(ValueError) as info:
        call_sparse(args, **kwargs)
    _assert_reaches_device_check(info)
    _assert_unplanned(args)


# ----------------------------------------------------------------------------------------------
# rejected
# ----------------------------------------------------------------------------------------------

EXTRA = (2, 3, 7)  # a second cache: page 2, 3 blocks, topk 7

# name: (sparse_args keywords, changes to the arguments, call keywords, exception, pattern)
REJECTED = {
    # indices: int32 (b, s_q, topk)
    "indices_int64": (dict(), dict(indices=lambda a: a["indices"].to(I64)), dict(), TypeError, INDICES),
    "indices_int16": (dict(), dict(indices=lambda a: a["indices"].to(I16)), dict(), TypeError, INDICES),
    "indices_float32": (dict(), dict(indices=lambda a: a["indices"].to(F32)), dict(), TypeError, INDICES),
    "indices_rank2": (dict(), dict(indices=zeros((2, 64), I32)), dict(), ValueError, INDICES),
    "indices_rank4": (dict(), dict(indices=zeros((2, 1, 64, 1), I32)), dict(), ValueError, INDICES),
    "indices_other_b": (dict(), dict(indices=zeros((3, 1, 64), I32)), dict(), ValueError, INDICES),
    "indices_other_s_q": (dict(), dict(indices=zeros((2, 2, 64), I32)), dict(), ValueError, INDICES),
    "indices_other_s_q_bf16": (dict(fmt="bf16_512", s_q=2), dict(indices=zeros((2, 1, 64), I32)), dict(), ValueError,
                               INDICES),
    # k_cache: h_kv 1, the format's last dim, the format's dtype
    "k_cache_h_kv2_bf16": (dict(fmt="bf16_576"), dict(k_cache=zeros((4, 64, 2, 576), BF16)), dict(), ValueError, K),
    "k_cache_h_kv2_v32": (dict(), dict(k_cache=zeros((4, 64, 2, 656), U8)), dict(), ValueError, K),
    "k_cache_rank3_v32": (dict(), dict(k_cache=zeros((256, 1, 656), U8)), dict(), ValueError, K),
    "fp8_cache_last_dim_576": (dict(), dict(k_cache=zeros((4, 64, 1, 576), U8)), dict(), ValueError, K),
    "fp8_cache_last_dim_512": (dict(fmt="model1"), dict(k_cache=zeros((4, 64, 1, 512), U8)), dict(), ValueError, K),
    "fp8_cache_last_dim_600": (dict(), dict(k_cache=zeros((4, 64, 1, 600), U8)), dict(), ValueError, K),
    "v32_cache_with_q512": (dict(fmt="model1"), dict(k_cache=lambda a: kvf.new_kv_cache_v32(4, 64)), dict(),
                            ValueError, f"{K}|{Q}"),
    "model1_cache_with_q576": (dict(), dict(k_cache=lambda a: kvf.new_kv_cache_model1(4, 64)), dict(), ValueError,
                               f"{K}|{Q}"),
    "bf16_cache_512_with_q576": (dict(fmt="bf16_576"), dict(k_cache=zeros((4, 64, 1, 512), BF16)), dict(),
                                 ValueError, K),
    "bf16_cache_576_with_q512": (dict(fmt="bf16_512"), dict(k_cache=zeros((4, 64, 1, 576), BF16)), dict(),
                                 ValueError, K),
    "bf16_format_fp16_cache": (dict(fmt="bf16_576"), dict(k_cache=zeros((4, 64, 1, 576), FP16)), dict(), TypeError,
                               K),
    "bf16_format_float32_cache": (dict(fmt="bf16_512"), dict(k_cache=zeros((4, 64, 1, 512), F32)), dict(),
                                  TypeError, K),
    "byte_cache_without_is_fp8_kvcache": (dict(), dict(is_fp8_kvcache=False), dict(), TypeError,
                                          r"k_cache|is_fp8_kvcache"),
    "is_fp8_kvcache_with_bf16_cache": (dict(fmt="bf16_576"), dict(is_fp8_kvcache=True), dict(), TypeError,
                                       r"k_cache|is_fp8_kvcache"),
    "fp8_cache_of_int32": (dict(), dict(k_cache=zeros((4, 64, 1, 164), I32)), dict(), TypeError, K),
    # q: bfloat16 (b, s_q, h_q, d_qk), last dim contiguous
    "q_fp16_v32": (dict(), dict(q=zeros((2, 1, 16, 576), FP16)), dict(), TypeError, Q),
    "q_float32_model1": (dict(fmt="model1"), dict(q=zeros((2, 1, 16, 512), F32)), dict(), TypeError, Q),
    "q_fp8_v32": (dict(), dict(q=zeros((2, 1, 16, 576), FP8)), dict(), TypeError, Q),
    "q_fp16_bf16_cache": (dict(fmt="bf16_576"), dict(q=zeros((2, 1, 16, 576), FP16)), dict(), TypeError,
                          f"{Q}|{K}"),
    "q_rank3": (dict(), dict(q=zeros((2, 16, 576), BF16)), dict(), ValueError, Q),
    "q_last_dim_strided": (dict(), dict(q=lambda a: torch.zeros((2, 1, 16, 1152), dtype=BF16)[..., ::2]), dict(),
                           ValueError, Q),
    "q_and_bf16_cache_d256": (dict(fmt="bf16_576"), dict(q=zeros((2, 1, 16, 256), BF16),
                                                         k_cache=zeros((4, 64, 1, 256), BF16)), dict(), ValueError,
                              rf"{Q}|{K}|d_qk|head_dim|576|512"),
    # the second cache: together with its indices, same format, h_kv 1
    "extra_k_cache_without_indices": (dict(extra=EXTRA), dict(extra_indices_in_kvcache=None), dict(), ValueError,
                                      "extra_indices_in_kvcache"),
    "extra_indices_without_cache": (dict(extra=EXTRA), dict(extra_k_cache=None), dict(), ValueError,
                                    "extra_k_cache"),
    "extra_topk_length_without_extra": (dict(), dict(extra_topk_length=zeros((2,), I32)), dict(), ValueError,
                                        "extra_topk_length"),
    "extra_topk_length_with_indices_only": (dict(extra=EXTRA), dict(extra_k_cache=None,
                                                                    extra_topk_length=zeros((2,), I32)),
                                            dict(), ValueError, "extra_k_cache|extra_topk_length"),
    "extra_indices_int64": (dict(extra=EXTRA), dict(extra_indices_in_kvcache=lambda a: a[
        "extra_indices_in_kvcache"].to(I64)), dict(), TypeError, "extra_indices_in_kvcache"),
    "extra_indices_float32": (dict(extra=EXTRA), dict(extra_indices_in_kvcache=zeros((2, 1, 7), F32)), dict(),
                              TypeError, "extra_indices_in_kvcache"),
    "extra_indices_other_b": (dict(extra=EXTRA), dict(extra_indices_in_kvcache=zeros((3, 1, 7), I32)), dict(),
                              ValueError, "extra_indices_in_kvcache"),
    "extra_indices_other_s_q": (dict(extra=EXTRA), dict(extra_indices_in_kvcache=zeros((2, 2, 7), I32)), dict(),
                                ValueError, "extra_indices_in_kvcache"),
    "extra_indices_rank2": (dict(extra=EXTRA), dict(extra_indices_in_kvcache=zeros((2, 7), I32)), dict(),
                            ValueError, "extra_indices_in_kvcache"),
    "extra_cache_other_fp8_format": (dict(extra=EXTRA), dict(extra_k_cache=lambda a: kvf.new_kv_cache_model1(3, 2)),
                                     dict(), ValueError, "extra_k_cache"),
    "extra_cache_bf16_with_fp8_main": (dict(extra=EXTRA), dict(extra_k_cache=zeros((3, 2, 1, 576), BF16)), dict(),
                                       TypeError, "extra_k_cache"),
    "extra_cache_fp8_with_bf16_main": (dict(fmt="bf16_576", extra=EXTRA),
                                       dict(extra_k_cache=lambda a: kvf.new_kv_cache_v32(3, 2)), dict(), TypeError,
                                       "extra_k_cache"),
    "extra_cache_h_kv2": (dict(fmt="bf16_576", extra=EXTRA), dict(extra_k_cache=zeros((3, 2, 2, 576), BF16)), dict(),
                          ValueError, "extra_k_cache"),
    "extra_cache_other_d": (dict(fmt="bf16_576", extra=EXTRA), dict(extra_k_cache=zeros((3, 2, 1, 512), BF16)),
                            dict(), ValueError, "extra_k_cache"),
    "extra_topk_length_int64": (dict(extra=EXTRA, extra_topk_length=True),
                                dict(extra_topk_length=zeros((2,), I64)), dict(), TypeError, "extra_topk_length"),
    "extra_topk_length_other_b": (dict(extra=EXTRA, extra_topk_length=True),
                                  dict(extra_topk_length=zeros((3,), I32)), dict(), ValueError, "extra_topk_length"),
    # topk_length: int32 (b,)
    "topk_length_int64": (dict(), dict(topk_length=zeros((2,), I64)), dict(), TypeError, TOPK_LENGTH),
    "topk_length_float32": (dict(), dict(topk_length=zeros((2,), F32)), dict(), TypeError, TOPK_LENGTH),
    "topk_length_other_b": (dict(), dict(topk_length=zeros((3,), I32)), dict(), ValueError, TOPK_LENGTH),
    "topk_length_2d": (dict(), dict(topk_length=zeros((2, 1), I32)), dict(), ValueError, TOPK_LENGTH),
    "topk_length_0d": (dict(b=1), dict(topk_length=zeros((), I32)), dict(), ValueError, TOPK_LENGTH),
    # attn_sink: float32 (h_q,)
    "attn_sink_bf16": (dict(), dict(attn_sink=zeros((16,), BF16)), dict(), TypeError, "attn_sink"),
    "attn_sink_float64": (dict(), dict(attn_sink=zeros((16,), F64)), dict(), TypeError, "attn_sink"),
    "attn_sink_int32": (dict(), dict(attn_sink=zeros((16,), I32)), dict(), TypeError, "attn_sink"),
    "attn_sink_other_h_q": (dict(), dict(attn_sink=zeros((17,), F32)), dict(), ValueError, "attn_sink"),
    "attn_sink_2d": (dict(), dict(attn_sink=zeros((1, 16), F32)), dict(), ValueError, "attn_sink"),
    "attn_sink_0d": (dict(h_q=1), dict(attn_sink=zeros((), F32)), dict(), ValueError, "attn_sink"),
    # the dense-only arguments
    "causal": (dict(), dict(causal=True), dict(), ValueError, "causal"),
    "causal_bf16": (dict(fmt="bf16_512"), dict(causal=True), dict(), ValueError, "causal"),
    "block_table_given": (dict(), dict(block_table=zeros((2, 4), I32)), dict(), ValueError, "block_table"),
    "cache_seqlens_given": (dict(), dict(cache_seqlens=lambda a: torch.full((2,), 64, dtype=I32)), dict(),
                            ValueError, "cache_seqlens"),
    "head_dim_v_576": (dict(), dict(head_dim_v=576), dict(), ValueError, "head_dim_v"),
    # preallocated outputs: out bfloat16 (b, s_q, h_q, 512), lse float32
    "out_float32": (dict(), dict(), dict(out=torch.zeros((2, 1, 16, DV), dtype=F32)), TypeError, "out"),
    "out_fp16": (dict(fmt="model1"), dict(), dict(out=torch.zeros((2, 1, 16, DV), dtype=FP16)), TypeError, "out"),
    "out_576_wide": (dict(), dict(), dict(out=torch.zeros((2, 1, 16, 576), dtype=BF16)), ValueError, "out"),
    "lse_float64": (dict(), dict(), dict(lse=torch.zeros((2, 16, 1), dtype=F64)), TypeError, "lse"),
}


@pytest.mark.parametrize("make, changes, kwargs, exc, match", list(REJECTED.values()), ids=list(REJECTED))
def test_sparse_rejected_arguments(make, changes, kwargs, exc, match):
    args = apply(sparse_args(**make), changes)
    with pytest.raises(exc, match=match) as info:
        call_sparse(args, **kwargs)
    _assert_argument_error(info, exc)
    _assert_unplanned(args)


@pytest.mark.parametrize("fmt", [f for f in D_QK if f not in ("v32", "bf16_576")])
def test_sparse_sm90_kernel_refused(fmt):
    """The Hopper token-sparse kernel takes the V3.2 format and 576-channel bf16 caches:
    kernel="sm90" with another format is refused before any planning."""
    args = sparse_args(fmt)
    with pytest.raises(ValueError, match=r"sm90.*V3\.2"):
        call_sparse(args, kernel="sm90")
    _assert_unplanned(args)


@pytest.mark.parametrize("fmt", ["v32", "bf16_576"])
def test_sparse_sm90_kernel_takes_its_formats(fmt):
    """kernel="sm90" with the V3.2 format or a 576-channel bf16 cache passes the argument checks
    (reaches the device check)."""
    args = sparse_args(fmt, extra=EXTRA, topk_length=True, extra_topk_length=True, sink=True)
    with pytest.raises(ValueError) as info:
        call_sparse(args, kernel="sm90")
    _assert_reaches_device_check(info)


@pytest.mark.parametrize("kernel", ["sm80_large", "sm80_small"])
@pytest.mark.parametrize("fmt", list(D_QK))
def test_sparse_portable_kernels_reach_device_check(fmt, kernel):
    args = sparse_args(fmt, extra=EXTRA, topk_length=True, extra_topk_length=True, sink=True)
    with pytest.raises(ValueError) as info:
        call_sparse(args, kernel=kernel)
    _assert_reaches_device_check(info)


def test_sparse_arguments_by_keyword_reach_device_check():
    """The same call with the sparse arguments by keyword (as later FlashMLA's callers write it)."""
    args = sparse_args("model1", extra=EXTRA, topk_length=True, extra_topk_length=True, sink=True)
    with pytest.raises(ValueError) as info:
        flash_mla.flash_mla_with_kvcache(
            args["q"], args["k_cache"], None, None, DV, args["tile_scheduler_metadata"], None,
            softmax_scale=args["softmax_scale"], causal=False, is_fp8_kvcache=True, indices=args["indices"],
            attn_sink=args["attn_sink"], extra_k_cache=args["extra_k_cache"],
            extra_indices_in_kvcache=args["extra_indices_in_kvcache"], topk_length=args["topk_length"],
            extra_topk_length=args["extra_topk_length"])
    _assert_reaches_device_check(info)
    _assert_unplanned(args)


def test_sparse_first_error_wins_over_device_check():
    """Several things wrong at once on CPU tensors: an argument error, never the device check."""
    args = sparse_args(extra=EXTRA)
    args["indices"] = args["indices"].to(I64)
    args["attn_sink"] = torch.zeros((3,), dtype=F64)
    with pytest.raises((TypeError, ValueError)) as info:
        call_sparse(args)
    assert re.search(r"indices|attn_sink", str(info.value)), str(info.value)
    assert not re.search(CUDA, str(info.value)), str(info.value)


# ----------------------------------------------------------------------------------------------
# flash_mla.ops.sparse_decode (DLPack): the same checks, CPU arrays stop at the device check
# ----------------------------------------------------------------------------------------------


def _ops_args(b=2, s_q=2, h_q=16, topk=64, lse_shape=None, q_dtype=torch.bfloat16, k_dtype=torch.uint8,
              token_bytes=656):
    from flash_mla import ops
    shapes = ops.sparse_workspace_shapes(b, s_q, h_q, 4)
    z = torch.zeros
    return dict(
        q=z((b, s_q, h_q, 576), dtype=q_dtype), k_cache=z((4, 64, 1, token_bytes), dtype=k_dtype),
        indices=z((b, s_q, topk), dtype=torch.int32),
        plan_seqlens=z(shapes["plan_seqlens"], dtype=torch.int32),
        tile_scheduler_metadata=z(shapes["tile_scheduler_metadata"], dtype=torch.int32),
        num_splits=z(shapes["num_splits"], dtype=torch.int32),
        out=z(shapes["out"], dtype=torch.bfloat16), lse=z(lse_shape or shapes["lse"], dtype=torch.float32),
        o_accum=z(shapes["o_accum"], dtype=torch.float32), lse_accum=z(shapes["lse_accum"], dtype=torch.float32))


@pytest.mark.parametrize("k_dtype", [torch.uint8, torch.int8, torch.float8_e4m3fn])
def test_ops_sparse_decode_reaches_device_check(k_dtype):
    from flash_mla import ops
    with pytest.raises(ValueError, match=r"(?i)cuda"):
        ops.sparse_decode(**_ops_args(k_dtype=k_dtype), is_fp8_kvcache=True)


@pytest.mark.parametrize("case, exc, needle", [
    (dict(q_dtype=torch.float16), TypeError, "q"),
    (dict(k_dtype=torch.float32), TypeError, "k_cache"),
    (dict(lse_shape=(2, 16, 2)), ValueError, "lse"),
])
def test_ops_sparse_decode_rejections(case, exc, needle):
    from flash_mla import ops
    with pytest.raises(exc, match=rf"\b{needle}\b") as info:
        ops.sparse_decode(**_ops_args(**case), is_fp8_kvcache=True)
    assert "CUDA" not in str(info.value)


def test_ops_sparse_decode_refuses_sm90_kernel():
    """ops: kernel="sm90" with the 512-dim format is refused (it takes V3.2 only)."""
    from flash_mla import ops
    with pytest.raises(ValueError, match="sm90"):
        ops.sparse_decode(**_ops_args(token_bytes=584), is_fp8_kvcache=True, kernel="sm90")
