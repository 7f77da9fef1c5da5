"""Argument checking of the public API, without a GPU (needs only the compiled module).

Every check happens in flash_mla._C (or the Python wrapper) before any launch, and
shape / dtype / stride / value checks come before the device check, so all of them can be
exercised with CPU tensors. Conventions:

* wrong dtype -> TypeError;
* wrong rank / shape / stride / page size / head dims / h_q % h_kv / metadata shape /
  softmax_scale / head_dim_v -> ValueError (page sizes: 16, 32, 64, 128 and 256 tokens are
  accepted, any other page_block_size is refused);
* everything right but on the CPU -> ValueError mentioning CUDA;
* each message names the offending argument.

Eager calls take the direct path into the compiled module; the tables of accepted and rejected
arguments also run through the torch.library custom ops (``path`` = "custom_op"), which must
give the same exceptions.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np

import pytest
import torch

import flash_mla
from flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata

from conftest import CPU_PARTS, ORDER, PAGE_SIZES, call, cpu_decode_args  # noqa: E402  (tests/python is on sys.path)

D = 576
DV = 512
PAGE = 64

# "q" as a word of its own (also accepts "h_q" / "s_q" / "q.shape" / "'q'").
Q = r"(?<![A-Za-z])q(?![A-Za-z])"
CUDA = r"(?i)cuda"


def last_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype as t, with stride(-1) == 2."""
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
    out = wide[..., ::2]
    assert out.shape == t.shape and out.stride(-1) == 2
    return out


def strided_1d(t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros((2 * t.shape[0],), dtype=t.dtype)[::2]
    assert out.shape == t.shape and out.stride(0) == 2
    return out


def with_(**changes):
    """Mutation setting some arguments; callables receive the current args dict."""
    def apply(args):
        for name, value in changes.items():
            args[name] = value(args) if callable(value) else value
    return apply


def _q(shape, dtype=torch.bfloat16):
    return lambda a: torch.zeros(shape, dtype=dtype)


def _k(shape, dtype=torch.bfloat16):
    return lambda a: torch.zeros(shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# accepted argument sets: only the device check fails
# ----------------------------------------------------------------------------------------------

ACCEPTED = {
    "bf16": dict(),
    "fp16": dict(dtype=torch.float16),
    "h_q3_s_q8": dict(h_q=3, s_q=8),
    "h_q128_h_kv8": dict(h_q=128, h_kv=8),
    "h_q20_h_kv2_s_q2": dict(h_q=20, h_kv=2, s_q=2),
    "b1": dict(b=1),
}


@pytest.mark.parametrize("kwargs", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_cpu_tensors_rejected_with_cuda_message(kwargs, path):
    with pytest.raises(ValueError, match=CUDA):
        call(cpu_decode_args(**kwargs))


ACCEPTED_LAYOUTS = {
    "q_head_slice": with_(q=lambda a: torch.zeros((2, 1, 20, D), dtype=torch.bfloat16)[:, :, 2:18]),
    "q_bhsd_transposed": with_(q=lambda a: torch.zeros((2, 16, 3, D), dtype=torch.bfloat16)
                               .transpose(1, 2)),
    "k_cache_head_slice": with_(k_cache=lambda a: torch.zeros((4, PAGE, 3, D),
                                                              dtype=torch.bfloat16)[:, :, 1:2]),
    "block_table_row_slice": with_(block_table=lambda a: torch.zeros((2, 5),
                                                                     dtype=torch.int32)[:, :2]),
    "block_table_junk": with_(block_table=torch.tensor([[0, -1], [10 ** 9, -(2 ** 31)]],
                                                       dtype=torch.int32)),
    "seqlens_zero": with_(cache_seqlens=torch.zeros((2,), dtype=torch.int32)),
}


@pytest.mark.parametrize("mutate", list(ACCEPTED_LAYOUTS.values()), ids=list(ACCEPTED_LAYOUTS))
def test_valid_layouts_reach_device_check(mutate, path):
    args = cpu_decode_args()
    mutate(args)
    with pytest.raises(ValueError, match=CUDA):
        call(args)


@pytest.mark.parametrize("options", [
    dict(softmax_scale=0.5), dict(causal=True), dict(kernel="auto"), dict(kernel="sm80_large"),
    dict(kernel="sm80_small"), dict(kernel="sm90"),
    dict(softmax_scale=1e-3, causal=True, kernel="sm80_small"),
], ids=["scale0.5", "causal", "kernel_auto", "kernel_sm80_large", "kernel_sm80_small",
        "kernel_sm90", "combined"])
def test_valid_options_reach_device_check(options):
    with pytest.raises(ValueError, match=CUDA):
        call(cpu_decode_args(), **options)


# ----------------------------------------------------------------------------------------------
# rejected argument sets
# ----------------------------------------------------------------------------------------------

BF16, FP16, F32, I32, I64 = torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64

REJECTED = {
    # dtypes -> TypeError
    "q_float32_k_float32": (with_(q=_q((2, 1, 16, D), F32), k_cache=_k((4, PAGE, 1, D), F32)),
                            TypeError, Q),
    "q_float32": (with_(q=_q((2, 1, 16, D), F32)), TypeError, Q),
    "q_float64": (with_(q=_q((2, 1, 16, D), torch.float64)), TypeError, Q),
    "q_int16": (with_(q=_q((2, 1, 16, D), torch.int16)), TypeError, Q),
    "k_cache_fp16_q_bf16": (with_(k_cache=_k((4, PAGE, 1, D), FP16)), TypeError, "k_cache"),
    "k_cache_float32": (with_(k_cache=_k((4, PAGE, 1, D), F32)), TypeError, "k_cache"),
    "block_table_int64": (with_(block_table=torch.zeros((2, 2), dtype=I64)), TypeError,
                          "block_table"),
    "block_table_float32": (with_(block_table=torch.zeros((2, 2), dtype=F32)), TypeError,
                            "block_table"),
    "cache_seqlens_int64": (with_(cache_seqlens=torch.zeros((2,), dtype=I64)), TypeError,
                            "cache_seqlens"),
    "cache_seqlens_float32": (with_(cache_seqlens=torch.zeros((2,), dtype=F32)), TypeError,
                              "cache_seqlens"),
    "metadata_int64": (with_(tile_scheduler_metadata=torch.zeros((CPU_PARTS, 8), dtype=I64)),
                       TypeError, "tile_scheduler_metadata"),
    "metadata_float32": (with_(tile_scheduler_metadata=torch.zeros((CPU_PARTS, 8), dtype=F32)),
                         TypeError, "tile_scheduler_metadata"),
    "num_splits_int64": (with_(num_splits=torch.zeros((3,), dtype=I64)), TypeError, "num_splits"),
    # q shape
    "q_rank3": (with_(q=_q((2, 16, D))), ValueError, Q),
    "q_rank5": (with_(q=_q((1, 2, 1, 16, D))), ValueError, Q),
    "q_d512": (with_(q=_q((2, 1, 16, 512))), ValueError, Q),
    "q_d640": (with_(q=_q((2, 1, 16, 640))), ValueError, Q),
    "q_s_q0": (with_(q=_q((2, 0, 16, D))), ValueError, Q),
    "q_h_q0": (with_(q=_q((2, 1, 0, D))), ValueError, Q),
    "q_last_dim_strided": (with_(q=lambda a: last_dim_strided(a["q"])), ValueError, Q),
    # k_cache shape
    "k_cache_rank3": (with_(k_cache=_k((4 * PAGE, 1, D))), ValueError, "k_cache"),
    "k_cache_d512": (with_(k_cache=_k((4, PAGE, 1, 512))), ValueError, "k_cache"),
    # (page sizes: the "page sizes" section below)
    "k_cache_h_kv0": (with_(k_cache=_k((4, PAGE, 0, D))), ValueError, "k_cache"),
    "k_cache_last_dim_strided": (with_(k_cache=lambda a: last_dim_strided(a["k_cache"])),
                                 ValueError, "k_cache"),
    # head counts
    "h_q3_h_kv2": (with_(q=_q((2, 1, 3, D)), k_cache=_k((4, PAGE, 2, D))), ValueError,
                   r"h_kv|h_q|num_heads"),
    "h_q16_h_kv3": (with_(k_cache=_k((4, PAGE, 3, D))), ValueError, r"h_kv|h_q|num_heads"),
    # block_table
    "block_table_rank1": (with_(block_table=torch.zeros((4,), dtype=I32)), ValueError,
                          "block_table"),
    "block_table_rank3": (with_(block_table=torch.zeros((2, 2, 1), dtype=I32)), ValueError,
                          "block_table"),
    "block_table_batch3": (with_(block_table=torch.zeros((3, 2), dtype=I32)), ValueError,
                           "block_table"),
    "block_table_batch1": (with_(block_table=torch.zeros((1, 2), dtype=I32)), ValueError,
                           "block_table"),
    "block_table_last_dim_strided": (with_(block_table=lambda a: last_dim_strided(a["block_table"])),
                                     ValueError, "block_table"),
    # cache_seqlens
    "cache_seqlens_rank2": (with_(cache_seqlens=torch.zeros((2, 1), dtype=I32)), ValueError,
                            "cache_seqlens"),
    "cache_seqlens_rank0": (with_(cache_seqlens=torch.zeros((), dtype=I32)), ValueError,
                            "cache_seqlens"),
    "cache_seqlens_batch3": (with_(cache_seqlens=torch.zeros((3,), dtype=I32)), ValueError,
                             "cache_seqlens"),
    "cache_seqlens_strided": (with_(cache_seqlens=lambda a: strided_1d(a["cache_seqlens"])),
                              ValueError, "cache_seqlens"),
    # head_dim_v
    "head_dim_v_576": (with_(head_dim_v=576), ValueError, "head_dim_v"),
    "head_dim_v_256": (with_(head_dim_v=256), ValueError, "head_dim_v"),
    "head_dim_v_0": (with_(head_dim_v=0), ValueError, "head_dim_v"),
    "head_dim_v_neg": (with_(head_dim_v=-512), ValueError, "head_dim_v"),
    # tile_scheduler_metadata
    "metadata_7_ints": (with_(tile_scheduler_metadata=torch.zeros((CPU_PARTS, 7), dtype=I32)),
                        ValueError, "tile_scheduler_metadata"),
    "metadata_9_ints": (with_(tile_scheduler_metadata=torch.zeros((CPU_PARTS, 9), dtype=I32)),
                        ValueError, "tile_scheduler_metadata"),
    "metadata_rank1": (with_(tile_scheduler_metadata=torch.zeros((CPU_PARTS * 8,), dtype=I32)),
                       ValueError, "tile_scheduler_metadata"),
    "metadata_rank3": (with_(tile_scheduler_metadata=torch.zeros((CPU_PARTS, 8, 1), dtype=I32)),
                       ValueError, "tile_scheduler_metadata"),
    "metadata_transposed": (with_(tile_scheduler_metadata=torch.zeros((8, CPU_PARTS), dtype=I32).t()),
                            ValueError, "tile_scheduler_metadata"),
    # num_splits
    "num_splits_len_b": (with_(num_splits=torch.zeros((2,), dtype=I32)), ValueError,
                         "num_splits"),
    "num_splits_len_b_plus_2": (with_(num_splits=torch.zeros((4,), dtype=I32)), ValueError,
                                "num_splits"),
    "num_splits_rank2": (with_(num_splits=torch.zeros((3, 1), dtype=I32)), ValueError,
                         "num_splits"),
    "num_splits_strided": (with_(num_splits=lambda a: strided_1d(a["num_splits"])), ValueError,
                           "num_splits"),
}


@pytest.mark.parametrize("mutate, exc, match", list(REJECTED.values()), ids=list(REJECTED))
def test_rejected_arguments(mutate, exc, match, path):
    args = cpu_decode_args()
    mutate(args)
    with pytest.raises(exc, match=match) as info:
        call(args)
    # Shape / dtype checks come before the device check: a complaint about the device would
    # mean the real problem went unnoticed (the device message may name the argument too).
    assert not re.search(CUDA, str(info.value)), str(info.value)


# ----------------------------------------------------------------------------------------------
# page sizes: 16, 32, 64, 128, 256 tokens per page accepted, anything else refused
# ----------------------------------------------------------------------------------------------

UNSUPPORTED_PAGES = (48, 8, 512, 1, 65, 96)
SUPPORTED_PAGES_TEXT = "16, 32, 64, 128, 256"


def _assert_reaches_device_check(info):
    """The call got past every argument check: the error is the CUDA-device one, and says
    nothing about the page size."""
    msg = str(info.value)
    assert re.search(CUDA, msg), msg
    assert "page_block_size" not in msg and "page size" not in msg, msg


def _assert_page_size_refused(info):
    msg = str(info.value)
    assert "page_block_size" in msg and SUPPORTED_PAGES_TEXT in msg, msg
    assert not re.search(CUDA, msg), msg  # found before the device check


@pytest.mark.parametrize("kwargs", [dict(), dict(dtype=FP16), dict(h_q=3, s_q=2), dict(h_q=128, h_kv=8)],
                         ids=["bf16", "fp16", "h_q3_s_q2", "h_q128_h_kv8"])
@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_supported_page_sizes_reach_device_check(page, kwargs, path):
    args = cpu_decode_args(page=page, **kwargs)
    assert args["k_cache"].shape[1] == page
    with pytest.raises(ValueError) as info:
        call(args)
    _assert_reaches_device_check(info)


@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_supported_page_sizes_with_padded_strides_reach_device_check(page, path):
    """Pages further apart than page * h_kv * 576 elements (a slice of a longer page) and a
    head slice: strides other than the last are free."""
    args = cpu_decode_args(page=page)
    n = args["k_cache"].shape[0]
    args["k_cache"] = torch.zeros((n, page + 4, 1, D), dtype=BF16)[:, 2:page + 2]
    with pytest.raises(ValueError) as info:
        call(args)
    _assert_reaches_device_check(info)
    args["k_cache"] = torch.zeros((n, page, 3, D), dtype=BF16)[:, :, 1:2]
    with pytest.raises(ValueError) as info:
        call(args)
    _assert_reaches_device_check(info)


@pytest.mark.parametrize("page", UNSUPPORTED_PAGES, ids=[f"page{p}" for p in UNSUPPORTED_PAGES])
def test_unsupported_page_size_rejected(page, path):
    with pytest.raises(ValueError, match="page_block_size") as info:
        call(cpu_decode_args(page=page))
    _assert_page_size_refused(info)


@pytest.mark.parametrize("page", [48, 512], ids=["page48", "page512"])
def test_unsupported_page_size_rejected_with_fp16_and_options(page):
    with pytest.raises(ValueError, match="page_block_size") as info:
        call(cpu_decode_args(page=page, dtype=FP16, s_q=2), causal=True, kernel="sm80_small")
    _assert_page_size_refused(info)
    with pytest.raises(ValueError, match="page_block_size") as info:
        call(cpu_decode_args(page=page), check_inputs=True)
    _assert_page_size_refused(info)


@pytest.mark.parametrize("page", [48, 8], ids=["page48", "page8"])
def test_sched_with_unsupported_page_size_raises_and_stays_empty(page):
    args = cpu_decode_args(page=page)
    sched, _ = get_mla_metadata()
    args["tile_scheduler_metadata"], args["num_splits"] = sched, None
    with pytest.raises(ValueError, match="page_block_size") as info:
        call(args, causal=True)
    _assert_page_size_refused(info)
    assert sched.config is None and sched.tile_scheduler_metadata is None


@pytest.mark.parametrize("page", [16, 256], ids=["page16", "page256"])
def test_sched_with_supported_page_size_reaches_device_check(page):
    args = cpu_decode_args(page=page)
    sched, _ = get_mla_metadata()
    args["tile_scheduler_metadata"], args["num_splits"] = sched, None
    with pytest.raises(ValueError) as info:
        call(args, causal=True)
    _assert_reaches_device_check(info)
    assert sched.config is None


@pytest.mark.parametrize("page", [16, 256], ids=["page16", "page256"])
def test_check_inputs_with_supported_page_size_reaches_device_check(page):
    with pytest.raises(ValueError) as info:
        call(cpu_decode_args(page=page), check_inputs=True)
    _assert_reaches_device_check(info)


# flash_mla.ops: the same k_cache shapes, NumPy arrays (host memory: the device check fails last)

def _ops_decode_arrays(page, dtype=np.float16):
    b, s_q, h_q, h_kv, parts = 2, 1, 16, 1, CPU_PARTS
    torch_args = cpu_decode_args(b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, dtype=torch.float16, page=page)
    shapes = flash_mla.ops.workspace_shapes(b, s_q, h_q, h_kv, parts)
    arrays = [torch_args[n].numpy() for n in ("q", "k_cache", "block_table", "cache_seqlens",
                                              "tile_scheduler_metadata", "num_splits")]
    return arrays + [np.zeros(shapes["out"], dtype), np.zeros(shapes["lse"], np.float32),
                     np.zeros(shapes["o_accum"], np.float32), np.zeros(shapes["lse_accum"], np.float32)]


@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_ops_decode_supported_page_sizes_reach_device_check(page):
    arrays = _ops_decode_arrays(page)
    assert arrays[1].shape[1] == page
    with pytest.raises(ValueError) as info:
        flash_mla.ops.mla_decode(*arrays, causal=True, stream=0)
    _assert_reaches_device_check(info)


@pytest.mark.parametrize("page", UNSUPPORTED_PAGES, ids=[f"page{p}" for p in UNSUPPORTED_PAGES])
def test_ops_decode_unsupported_page_size_rejected(page):
    with pytest.raises(ValueError, match="page_block_size") as info:
        flash_mla.ops.mla_decode(*_ops_decode_arrays(page), causal=True, stream=0)
    _assert_page_size_refused(info)


# ops.check_paged_inputs(..., *, page_size=64) and ops.input_check_error(..., *, page_size=64)

def _check_arrays():
    return (np.zeros((3, 2), np.int32), np.zeros((3,), np.int32), 10, np.zeros((8,), np.int64))


def test_check_paged_inputs_page_size_is_keyword_only_default_64():
    for fn in (flash_mla.ops.check_paged_inputs, flash_mla.ops.input_check_error):
        param = inspect.signature(fn).parameters["page_size"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, fn.__name__
        assert param.default == 64, fn.__name__
    with pytest.raises(TypeError):
        flash_mla.ops.check_paged_inputs(*_check_arrays(), None, 16)  # positional page_size


@pytest.mark.parametrize("page_size", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_check_paged_inputs_supported_page_sizes_reach_device_check(page_size):
    with pytest.raises(ValueError) as info:
        flash_mla.ops.check_paged_inputs(*_check_arrays(), page_size=page_size)
    msg = str(info.value)
    assert re.search(CUDA, msg) and "page_size" not in msg, msg


@pytest.mark.parametrize("page_size", [0, 48, True, "64", -64, 512, 1.5, 64.0],
                         ids=["zero", "48", "true", "str", "negative", "512", "float", "float_integral"])
def test_check_paged_inputs_bad_page_size(page_size):
    with pytest.raises((TypeError, ValueError)) as info:
        flash_mla.ops.check_paged_inputs(*_check_arrays(), page_size=page_size)
    msg = str(info.value)
    assert "page_size" in msg and not re.search(CUDA, msg), msg


def test_input_check_error_page_size_in_message():
    too_long = [1, 3, -1, 5000, 1, 0, 0, 0]
    for page_size, text in ((None, "64 * max_blocks_per_seq = 256"), (16, "16 * max_blocks_per_seq = 64"),
                             (64, "64 * max_blocks_per_seq = 256"), (256, "256 * max_blocks_per_seq = 1024")):
        kwargs = {} if page_size is None else dict(page_size=page_size)
        msg = flash_mla.ops.input_check_error(too_long, num_blocks=10, max_blocks_per_seq=4, **kwargs)
        assert "cache_seqlens[3] = 5000" in msg, msg
        assert f"[0, {text}]" in msg, msg
    msg = flash_mla.ops.input_check_error(too_long, page_size=16)  # the table width unknown
    assert "[0, 16 * max_blocks_per_seq]" in msg, msg
    bad_page = [2, 1, 2, -7, 4, 0, 0, 0]
    for page_size in PAGE_SIZES:
        msg = flash_mla.ops.input_check_error(bad_page, num_blocks=10, max_blocks_per_seq=4, page_size=page_size)
        assert "block_table[1, 2] = -7" in msg and "num_blocks = 10" in msg and "4 invalid" in msg, msg
    assert flash_mla.ops.input_check_error([0] * 8, page_size=16) is None


@pytest.mark.parametrize("scale", [0.0, -0.0, -1.0, math.nan, math.inf, -math.inf],
                         ids=["zero", "neg_zero", "negative", "nan", "inf", "neg_inf"])
def test_bad_softmax_scale(scale):
    with pytest.raises(ValueError, match="softmax_scale"):
        call(cpu_decode_args(), softmax_scale=scale)


@pytest.mark.parametrize("kernel", ["bogus", "", "SM80_LARGE", "sm80"])
def test_unknown_kernel_choice(kernel):
    with pytest.raises(ValueError, match="kernel"):
        call(cpu_decode_args(), kernel=kernel)


# ----------------------------------------------------------------------------------------------
# keyword arguments of later FlashMLA releases
# ----------------------------------------------------------------------------------------------

SPARSE_ONLY_SET = {
    "indices": torch.zeros((2, 1, 64), dtype=I32),
    "attn_sink": torch.zeros((16,), dtype=F32),
    "extra_k_cache": torch.zeros((4, PAGE, 1, D), dtype=BF16),
    "extra_indices_in_kvcache": torch.zeros((2, 1, 64), dtype=I32),
    "topk_length": torch.zeros((2,), dtype=I32),
    "extra_topk_length": torch.zeros((2,), dtype=I32),
}


@pytest.mark.parametrize("form", ["seed", "sched"])
@pytest.mark.parametrize("name", list(SPARSE_ONLY_SET))
def test_sparse_kwargs_on_a_dense_call_raise(name, form):
    """Token-sparse arguments on a dense call (block_table given) name what does not belong."""
    args = cpu_decode_args()
    if form == "sched":
        sched, placeholder = get_mla_metadata()
        args["tile_scheduler_metadata"], args["num_splits"] = sched, placeholder
    with pytest.raises(ValueError, match="block_table" if name == "indices" else name):
        call(args, **{name: SPARSE_ONLY_SET[name]})
    if form == "sched":
        assert sched.config is None


@pytest.mark.parametrize("form", ["seed", "sched"])
def test_default_valued_feature_kwargs_accepted(form):
    args = cpu_decode_args()
    if form == "sched":
        args["tile_scheduler_metadata"], args["num_splits"] = get_mla_metadata()
    with pytest.raises(ValueError, match=CUDA):
        call(args, is_fp8_kvcache=False, indices=None, attn_sink=None, extra_k_cache=None,
             extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None,
             descale_q=None, descale_k=None)


@pytest.mark.parametrize("name", ["descale_q", "descale_k"])
def test_descale_with_16bit_inputs_raises(name):
    # The FP8 descales are supported, but only with FP8 inputs: named before any device check.
    with pytest.raises(ValueError, match=name):
        call(cpu_decode_args(), **{name: torch.ones((1,), dtype=F32)})


def test_is_fp8_kvcache_with_16bit_cache_raises():
    with pytest.raises(TypeError, match="is_fp8_kvcache"):
        call(cpu_decode_args(), is_fp8_kvcache=True)


def test_unknown_kwarg_raises_type_error():
    with pytest.raises(TypeError, match="no_such_option"):
        call(cpu_decode_args(), no_such_option=1)


# ----------------------------------------------------------------------------------------------
# the scheduler object on the CPU
# ----------------------------------------------------------------------------------------------


def test_get_mla_metadata_without_arguments():
    sched, placeholder = get_mla_metadata()
    assert isinstance(sched, FlashMLASchedMeta)
    assert placeholder is None
    assert sched.config is None and sched.tile_scheduler_metadata is None
    assert sched.num_splits is None
    assert "empty" in repr(sched)
    other, _ = get_mla_metadata()
    assert other is not sched


def test_sched_with_cpu_tensors_raises_and_stays_empty():
    args = cpu_decode_args()
    sched, _ = get_mla_metadata()
    args["tile_scheduler_metadata"], args["num_splits"] = sched, None
    with pytest.raises(ValueError, match=CUDA):
        call(args, causal=True)
    assert sched.config is None and sched.tile_scheduler_metadata is None


def test_sched_with_bad_head_ratio_raises():
    args = cpu_decode_args()
    args["q"] = torch.zeros((2, 1, 3, D), dtype=BF16)
    args["k_cache"] = torch.zeros((4, PAGE, 2, D), dtype=BF16)
    sched, _ = get_mla_metadata()
    args["tile_scheduler_metadata"], args["num_splits"] = sched, None
    with pytest.raises(ValueError, match=r"h_kv|h_q|num_heads"):
        call(args)
    assert sched.config is None


def test_sched_with_float_seqlens_raises_type_error():
    args = cpu_decode_args()
    args["cache_seqlens"] = torch.zeros((2,), dtype=F32)
    sched, _ = get_mla_metadata()
    args["tile_scheduler_metadata"], args["num_splits"] = sched, None
    with pytest.raises(TypeError, match="cache_seqlens"):
        call(args)
    assert sched.config is None


# ----------------------------------------------------------------------------------------------
# get_mla_metadata (seed form)
# ----------------------------------------------------------------------------------------------


def seqlens(n=3, dtype=I32):
    return torch.full((n,), 100, dtype=dtype)


def test_get_mla_metadata_cpu_seqlens_mention_cuda():
    with pytest.raises(ValueError, match=CUDA):
        get_mla_metadata(seqlens(), 16, 1)


@pytest.mark.parametrize("dtype", [F32, I64, torch.int16], ids=["float32", "int64", "int16"])
def test_get_mla_metadata_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="cache_seqlens"):
        get_mla_metadata(seqlens(dtype=dtype), 16, 1)


@pytest.mark.parametrize("make", [
    lambda: torch.zeros((3, 1), dtype=I32),
    lambda: torch.zeros((), dtype=I32),
    lambda: torch.zeros((6,), dtype=I32)[::2],
], ids=["rank2", "rank0", "strided"])
def test_get_mla_metadata_wrong_shape(make):
    with pytest.raises(ValueError, match="cache_seqlens") as info:
        get_mla_metadata(make(), 16, 1)
    assert not re.search(CUDA, str(info.value)), str(info.value)


@pytest.mark.parametrize("value", [0, -1], ids=["zero", "negative"])
def test_get_mla_metadata_bad_num_heads_k(value):
    with pytest.raises(ValueError, match="num_heads_k"):
        get_mla_metadata(seqlens(), 16, value)


@pytest.mark.parametrize("value", [0, -16], ids=["zero", "negative"])
def test_get_mla_metadata_bad_num_heads_per_head_k(value):
    with pytest.raises(ValueError, match="num_heads_per_head_k"):
        get_mla_metadata(seqlens(), value, 1)


def test_get_mla_metadata_missing_or_extra_arguments():
    with pytest.raises(TypeError):
        get_mla_metadata(seqlens(), 16)
    with pytest.raises(TypeError):
        get_mla_metadata(seqlens(), 16, 1, 16, False, None, 99)


def test_get_mla_metadata_kwargs():
    # is_fp8_kvcache does not change a dense plan; topk (token-sparse) gives a scheduler object.
    with pytest.raises(ValueError, match=CUDA):
        get_mla_metadata(seqlens(), 16, 1, is_fp8_kvcache=True)
    sched, placeholder = get_mla_metadata(is_fp8_kvcache=True)
    assert isinstance(sched, FlashMLASchedMeta) and placeholder is None
    sched, placeholder = get_mla_metadata(seqlens(), 16, 1, topk=2048)
    assert isinstance(sched, FlashMLASchedMeta) and sched.config is None and placeholder is None
    with pytest.raises(TypeError, match="no_such_option"):
        get_mla_metadata(seqlens(), 16, 1, no_such_option=3)
    with pytest.raises(TypeError):
        get_mla_metadata(seqlens(), 16, 1, num_q_tokens_per_head_k=16)


@pytest.mark.parametrize("kwargs", [
    dict(is_fp8_kvcache=False),
    dict(topk=None),
    dict(num_heads_q=16),
], ids=["is_fp8_kvcache_false", "topk_none", "num_heads_q"])
def test_get_mla_metadata_harmless_kwargs_reach_device_check(kwargs):
    with pytest.raises(ValueError, match=CUDA):
        get_mla_metadata(seqlens(), 16, 1, **kwargs)


def test_get_mla_metadata_intermediate_release_spelling():
    """FlashMLA releases between the seed and the scheduler-object API named the second
    argument num_q_tokens_per_head_k and added num_heads_q."""
    with pytest.raises(ValueError, match=CUDA):
        get_mla_metadata(seqlens(), num_q_tokens_per_head_k=16, num_heads_k=1, num_heads_q=16)
    with pytest.raises(ValueError, match="num_heads_per_head_k"):
        get_mla_metadata(seqlens(), num_q_tokens_per_head_k=0, num_heads_k=1)


def test_get_mla_metadata_without_seqlens_gives_scheduler_object():
    """Later releases accept (and ignore) the old arguments when cache_seqlens is absent."""
    sched, placeholder = get_mla_metadata(num_heads_per_head_k=16, num_heads_k=1)
    assert isinstance(sched, FlashMLASchedMeta) and placeholder is None


def test_tensor_metadata_needs_num_splits():
    args = cpu_decode_args()
    args["num_splits"] = None
    with pytest.raises(ValueError, match="num_splits"):
        call(args)


def test_positional_later_release_arguments():
    """Later releases take is_fp8_kvcache, indices, ... positionally after causal."""
    args = cpu_decode_args()
    positional = [args[name] for name in ORDER] + [None, False]
    with pytest.raises(TypeError, match="is_fp8_kvcache"):  # a 16-bit cache declared FP8
        flash_mla_with_kvcache(*positional, True)
    with pytest.raises(ValueError, match="block_table"):  # indices: the token-sparse form
        flash_mla_with_kvcache(*positional, False, torch.zeros((2, 1, 64), dtype=I32))
    with pytest.raises(ValueError, match=CUDA):
        flash_mla_with_kvcache(*positional, False, None, None)


def test_package_exports():
    for name in ("FlashMLASchedMeta", "flash_mla_with_kvcache", "get_mla_metadata", "host_plan",
                 "kernel_for_device"):
        assert callable(getattr(flash_mla, name)), name


# ----------------------------------------------------------------------------------------------
# scalar arguments: TypeError naming the argument (not a dispatcher message)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, 16.0, "16", None, True, False, [16], np.float32(16)],
                         ids=["float", "float_integral", "str", "none", "true", "false", "list", "np_float"])
@pytest.mark.parametrize("name", ["num_heads_per_head_k", "num_heads_k"])
def test_get_mla_metadata_head_count_types(name, value):
    kwargs = dict(num_heads_per_head_k=16, num_heads_k=1)
    kwargs[name] = value
    with pytest.raises(TypeError, match=name) as info:
        get_mla_metadata(seqlens(), **kwargs)
    if value is not None:
        assert "expected an int" in str(info.value)


@pytest.mark.parametrize("value", [2 ** 31, 2 ** 63, 2 ** 70, -(2 ** 63)], ids=["2^31", "2^63", "2^70", "-2^63"])
@pytest.mark.parametrize("name", ["num_heads_per_head_k", "num_heads_k"])
def test_get_mla_metadata_head_count_range(name, value):
    kwargs = dict(num_heads_per_head_k=16, num_heads_k=1)
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        get_mla_metadata(seqlens(), **kwargs)


@pytest.mark.parametrize("value", [np.int64(16), np.int32(16), torch.tensor(16)], ids=["np_int64", "np_int32", "tensor"])
def test_get_mla_metadata_integer_like_head_counts_accepted(value):
    with pytest.raises(ValueError, match=CUDA):
        get_mla_metadata(seqlens(), value, 1)
    with pytest.raises(ValueError, match=CUDA):
        get_mla_metadata(seqlens(), 16, value // 16)


@pytest.mark.parametrize("value", ["abc", "0.1", b"0.1", True, False, 1j, [0.1], object(), torch.ones(2)],
                         ids=["str", "numeric_str", "bytes", "true", "false", "complex", "list", "object",
                              "tensor_2"])
def test_softmax_scale_types(value, path):
    with pytest.raises(TypeError, match="softmax_scale"):
        call(cpu_decode_args(), softmax_scale=value)


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.1), np.float64(0.1), torch.tensor(0.1)],
                         ids=["float", "int", "np_float32", "np_float64", "tensor_0d"])
def test_softmax_scale_numbers_accepted(value, path):
    with pytest.raises(ValueError, match=CUDA):
        call(cpu_decode_args(), softmax_scale=value)


@pytest.mark.parametrize("value", [512.0, "512", None, True, [512]], ids=["float", "str", "none", "true", "list"])
def test_head_dim_v_types(value, path):
    args = cpu_decode_args()
    args["head_dim_v"] = value
    with pytest.raises(TypeError, match="head_dim_v"):
        call(args)


@pytest.mark.parametrize("value", [2 ** 63, 2 ** 70, -(2 ** 63) - 1], ids=["2^63", "2^70", "below_int64"])
def test_head_dim_v_huge(value, path):
    args = cpu_decode_args()
    args["head_dim_v"] = value
    with pytest.raises(ValueError, match="head_dim_v"):
        call(args)


def test_head_dim_v_numpy_int_accepted(path):
    args = cpu_decode_args()
    args["head_dim_v"] = np.int64(512)
    with pytest.raises(ValueError, match=CUDA):
        call(args)


@pytest.mark.parametrize("value", ["yes", b"", "False"], ids=["str", "bytes", "str_false"])
def test_causal_strings_rejected(value, path):
    with pytest.raises(TypeError, match="causal"):
        call(cpu_decode_args(), causal=value)


@pytest.mark.parametrize("value", [0, 1, None, np.bool_(True)], ids=["zero", "one", "none", "np_bool"])
def test_causal_truthy_values_accepted(value, path):
    with pytest.raises(ValueError, match=CUDA):
        call(cpu_decode_args(), causal=value)


@pytest.mark.parametrize("kernel", [None, 3, 1.0, ["auto"]], ids=["none", "int", "float", "list"])
def test_non_string_kernel_choice(kernel):
    with pytest.raises(ValueError, match="kernel"):
        call(cpu_decode_args(), kernel=kernel)


@pytest.mark.parametrize("name", ["q", "k_cache"])
def test_inputs_requiring_grad(name, path):
    """flash-mla has no backward: tensors that require grad are refused with a hint, on both
    paths (the custom-op path reaches the same check in its implementation)."""
    args = cpu_decode_args()
    args[name] = args[name].clone().requires_grad_(True)
    with pytest.raises(TypeError, match=rf"{name}: .*detach"):
        call(args)


def test_out_requiring_grad(path):
    args = cpu_decode_args()
    out = torch.empty((2, 1, 16, DV), dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(TypeError, match=r"out: .*detach"):
        call(args, out=out)


def test_inputs_requiring_grad_under_no_grad(path):
    """The custom-op path sees the flag as well: refused on both paths alike."""
    args = cpu_decode_args()
    args["q"] = args["q"].clone().requires_grad_(True)
    with torch.no_grad(), pytest.raises(TypeError, match=r"q: .*detach"):
        call(args)


# ----------------------------------------------------------------------------------------------
# kernel_for_device without a GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA device")
@pytest.mark.parametrize("device", [None, "cuda", "cuda:0", 0, torch.device("cuda", 1)],
                         ids=["default", "cuda", "cuda0", "int", "device1"])
def test_kernel_for_device_without_cuda(device):
    with pytest.raises(RuntimeError, match="flash_mla: no CUDA device") as info:
        flash_mla.kernel_for_device(device)
    assert type(info.value) is RuntimeError  # not torch's AssertionError


@pytest.mark.parametrize("device", ["cpu", torch.device("meta")], ids=["cpu", "meta"])
def test_kernel_for_device_non_cuda_device(device):
    with pytest.raises(ValueError, match="device"):
        flash_mla.kernel_for_device(device)


def test_kernel_for_device_bad_arguments():
    with pytest.raises(ValueError, match="kernel"):
        flash_mla.kernel_for_device(kernel="bogus")
    with pytest.raises(ValueError, match="kernel"):
        flash_mla.kernel_for_device(kernel=None)
    with pytest.raises(TypeError, match="device"):
        flash_mla.kernel_for_device(True)
    with pytest.raises(TypeError, match="device"):
        flash_mla.kernel_for_device(1.5)


# ----------------------------------------------------------------------------------------------
# the compiled module's two ways of reading a torch tensor give the same answers
# ----------------------------------------------------------------------------------------------

_READER_SCRIPT = r"""
import json, torch
import flash_mla
from flash_mla import flash_mla_with_kvcache
D, PAGE = 576, 64
def base():
    return dict(q=torch.zeros((2, 1, 16, D), dtype=torch.bfloat16),
                k_cache=torch.zeros((4, PAGE, 1, D), dtype=torch.bfloat16),
                block_table=torch.zeros((2, 2), dtype=torch.int32),
                cache_seqlens=torch.full((2,), 70, dtype=torch.int32),
                meta=torch.zeros((4, 8), dtype=torch.int32), splits=torch.zeros((3,), dtype=torch.int32))
cases = {
    "ok": {},
    "q_f64": dict(q=torch.zeros((2, 1, 16, D), dtype=torch.float64)),
    "k_bool": dict(k_cache=torch.zeros((4, PAGE, 1, D), dtype=torch.bool)),
    "k_complex": dict(k_cache=torch.zeros((4, PAGE, 1, D), dtype=torch.complex64)),
    "q_rank9": dict(q=torch.zeros((1,) * 5 + (2, 1, 16, D), dtype=torch.bfloat16)),
    "q_strided": dict(q=torch.zeros((2, 1, 16, 2 * D), dtype=torch.bfloat16)[..., ::2]),
    "q_transposed": dict(q=torch.zeros((2, 16, 1, D), dtype=torch.bfloat16).transpose(1, 2)),
    "bt_expanded": dict(block_table=torch.zeros((1, 2), dtype=torch.int32).expand(2, 2)),
    "sl_strided": dict(cache_seqlens=torch.zeros((4,), dtype=torch.int32)[::2]),
    "meta_transposed": dict(meta=torch.zeros((8, 4), dtype=torch.int32).t()),
    "k_meta_device": dict(k_cache=torch.zeros((4, PAGE, 1, D), dtype=torch.bfloat16, device="meta")),
    "k_conj_view": dict(k_cache=torch.zeros((4, PAGE, 1, D), dtype=torch.complex64).conj()),
    "k_fp8": dict(k_cache=torch.zeros((4, PAGE, 1, D), dtype=torch.float8_e4m3fn)),
    "q_fp8": dict(q=torch.zeros((2, 1, 16, D), dtype=torch.float8_e4m3fn)),
    "k_e5m2": dict(k_cache=torch.zeros((4, PAGE, 1, D), dtype=torch.float8_e5m2)),
    "empty_batch": dict(q=torch.zeros((0, 1, 16, D), dtype=torch.bfloat16),
                        block_table=torch.zeros((0, 2), dtype=torch.int32),
                        cache_seqlens=torch.zeros((0,), dtype=torch.int32), splits=torch.zeros((1,), dtype=torch.int32)),
}
result = {}
for name, change in cases.items():
    a = base(); a.update(change)
    try:
        flash_mla_with_kvcache(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], 512, a["meta"], a["splits"])
        result[name] = "returned"
    except Exception as exc:
        result[name] = f"{type(exc).__name__}: {exc}"
a = base()
try:
    flash_mla._C.torch_check_decode(a["q"].to("meta"), a["k_cache"], a["block_table"], a["cache_seqlens"], 512,
                                    a["meta"], a["splits"], 0.1)
except Exception as exc:
    result["q_meta_device"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


def test_tensor_readers_agree():
    """torch._C._to_dlpack (default) and the attribute reader (FLASH_MLA_TENSOR_READ=attributes,
    the fallback for tensors the exporter refuses) must check alike, message for message."""
    import json
    import os
    import subprocess
    import sys

    outputs = {}
    for mode in ("", "attributes"):
        env = dict(os.environ, FLASH_MLA_TENSOR_READ=mode)
        proc = subprocess.run([sys.executable, "-c", _READER_SCRIPT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outputs[""] == outputs["attributes"]
    got = outputs[""]
    assert re.search(CUDA, got["ok"]) and got["ok"].startswith("ValueError: q:")
    assert got["q_f64"] == "TypeError: q: expected dtype bfloat16, float16 or float8_e4m3fn, got float64"
    assert got["k_bool"] == "TypeError: k_cache: dtype must match q (bfloat16) or be float8_e4m3fn, got bool"
    # float8_e4m3fn is recognised by both readers (the FP8 cache then needs its descale) ...
    assert got["k_fp8"].startswith("ValueError: descale_k: required with a float8_e4m3fn k_cache")
    assert got["q_fp8"].startswith("TypeError: k_cache: a float8_e4m3fn q needs a float8_e4m3fn k_cache")
    # ... and other FP8 encodings are not taken for it.
    assert got["k_e5m2"] == "TypeError: k_cache: dtype must match q (bfloat16) or be float8_e4m3fn, got float8_e5m2"
    assert got["q_rank9"].startswith("ValueError: q: expected 4 dims") and "..." in got["q_rank9"]
    assert got["q_strided"].startswith("ValueError: q: the last dim must be contiguous")
    assert re.search(CUDA, got["q_transposed"]) and re.search(CUDA, got["bt_expanded"])
    assert got["sl_strided"] == "ValueError: cache_seqlens: must be contiguous"
    assert got["meta_transposed"].startswith("ValueError: tile_scheduler_metadata:")
    # shapes and dtypes of a meta tensor (which the exporter refuses) are read all the same
    assert got["k_meta_device"] == "ValueError: q: must be a CUDA tensor, got one on the CPU"
    assert got["q_meta_device"] == "ValueError: q: must be a CUDA tensor, got one on device type meta"
    assert got["k_conj_view"] == "TypeError: k_cache: dtype must match q (bfloat16) or be float8_e4m3fn, got complex64"
    assert got["empty_batch"].startswith("ValueError: q: must be a CUDA tensor")
