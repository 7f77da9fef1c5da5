"""Argument checking of the dense FP8 KV cache, without a GPU (needs only the compiled module).

A float8_e4m3fn ``k_cache`` comes with ``descale_k``, a float32 tensor of shape (1,) on q's
device; a float8_e4m3fn ``q`` (which needs an FP8 cache) with ``descale_q`` alike, and then
``out`` is bfloat16. The dtype and shape checks of the descales come before the device checks,
so CPU tensors show them all, as in test_args_cpu.py:

* wrong dtype (a descale not float32, an FP8 q with a 16-bit cache, ``out`` of another dtype
  than the result's) -> TypeError naming the argument;
* a descale missing (FP8 tensor without it), extra (16-bit tensor with it) or of another shape
  than (1,) -> ValueError naming it;
* everything right but on the CPU -> ValueError mentioning CUDA.

The tables run on the direct eager path and through the torch.library custom ops (``path``),
which must give the same exceptions; flash_mla.ops.mla_decode (DLPack) checks alike.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import flash_mla
from flash_mla import get_mla_metadata

from conftest import CPU_PARTS, PAGE_SIZES, call, cpu_decode_args  # noqa: E402  (tests/python is on sys.path)

D = 576
DV = 512
CUDA = r"(?i)cuda"

BF16, FP16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
FP8 = torch.float8_e4m3fn


def fp8_args(q_dtype=BF16, k_dtype=FP8, k_shape=None, **kwargs):
    """cpu_decode_args with q of ``q_dtype`` and a cache of ``k_dtype`` (same shapes, or
    ``k_shape`` for the cache)."""
    args = cpu_decode_args(**kwargs)
    args["q"] = torch.zeros(args["q"].shape, dtype=q_dtype)
    args["k_cache"] = torch.zeros(k_shape or args["k_cache"].shape, dtype=k_dtype)
    return args


def scale(dtype=F32, shape=(1,)):
    return torch.ones(shape, dtype=dtype)


def out_of(args, dtype):
    b, s_q, h_q, _ = args["q"].shape
    return torch.zeros((b, s_q, h_q, DV), dtype=dtype)


def _assert_reaches_device_check(info):
    msg = str(info.value)
    assert re.search(CUDA, msg), msg


def _assert_argument_error(info, exc):
    """A dtype / shape complaint, not the device one: a ValueError about a descale's shape has
    no reason to mention CUDA, the device check's does (TypeErrors are never the device's)."""
    if exc is ValueError:
        assert not re.search(CUDA, str(info.value)), str(info.value)


# ----------------------------------------------------------------------------------------------
# accepted: only the device check fails
# ----------------------------------------------------------------------------------------------

ACCEPTED = {
    "q_bf16": (dict(), dict(descale_k=scale())),
    "q_fp16": (dict(q_dtype=FP16), dict(descale_k=scale())),
    "q_fp8": (dict(q_dtype=FP8), dict(descale_q=scale(), descale_k=scale())),
    "q_fp8_h_q3_s_q8": (dict(q_dtype=FP8, h_q=3, s_q=8), dict(descale_q=scale(), descale_k=scale())),
    "q_fp8_h_q128_h_kv8": (dict(q_dtype=FP8, h_q=128, h_kv=8), dict(descale_q=scale(), descale_k=scale())),
    "q_bf16_h_q20_h_kv2_s_q2": (dict(h_q=20, h_kv=2, s_q=2), dict(descale_k=scale())),
    "q_bf16_b1": (dict(b=1), dict(descale_k=scale())),
    "q_fp8_causal_scale": (dict(q_dtype=FP8), dict(descale_q=scale(), descale_k=scale(), causal=True,
                                                   softmax_scale=0.1)),
    "kernel_auto": (dict(), dict(descale_k=scale(), kernel="auto")),
    "kernel_sm80_large": (dict(), dict(descale_k=scale(), kernel="sm80_large")),
    "kernel_sm80_small": (dict(q_dtype=FP8), dict(descale_q=scale(), descale_k=scale(), kernel="sm80_small")),
    "check_inputs": (dict(), dict(descale_k=scale(), check_inputs=True)),
}


@pytest.mark.parametrize("make, kwargs", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_fp8_arguments_reach_device_check(make, kwargs, path):
    with pytest.raises(ValueError) as info:
        call(fp8_args(**make), **kwargs)
    _assert_reaches_device_check(info)


@pytest.mark.parametrize("q_dtype", [BF16, FP16, FP8], ids=["q_bf16", "q_fp16", "q_fp8"])
def test_fp8_out_of_the_result_dtype_reaches_device_check(q_dtype, path):
    """out= of the result's dtype: q's, or bfloat16 for an FP8 q."""
    args = fp8_args(q_dtype=q_dtype)
    kwargs = dict(descale_k=scale(), out=out_of(args, BF16 if q_dtype == FP8 else q_dtype))
    if q_dtype == FP8:
        kwargs["descale_q"] = scale()
    with pytest.raises(ValueError) as info:
        call(args, **kwargs)
    _assert_reaches_device_check(info)


@pytest.mark.parametrize("q_dtype", [BF16, FP8], ids=["q_bf16", "q_fp8"])
@pytest.mark.parametrize("page", PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def test_fp8_page_sizes_reach_device_check(page, q_dtype, path):
    args = fp8_args(q_dtype=q_dtype, page=page)
    kwargs = dict(descale_k=scale(), descale_q=scale() if q_dtype == FP8 else None)
    with pytest.raises(ValueError) as info:
        call(args, **kwargs)
    _assert_reaches_device_check(info)
    assert "page_block_size" not in str(info.value)


@pytest.mark.parametrize("page", [48, 512], ids=["page48", "page512"])
def test_fp8_unsupported_page_size_rejected(page, path):
    with pytest.raises(ValueError, match="page_block_size") as info:
        call(fp8_args(page=page), descale_k=scale())
    _assert_argument_error(info, ValueError)


def test_fp8_strided_caches_reach_device_check(path):
    """Pages further apart than their size and a head slice, in one-byte elements (strides
    multiples of 16 bytes)."""
    args = fp8_args()
    n = args["k_cache"].shape[0]
    for k in (torch.zeros((n, 64 + 4, 1, D), dtype=FP8)[:, 2:66],
              torch.zeros((n, 64, 3, D), dtype=FP8)[:, :, 1:2],
              torch.zeros((n, 64, 1, D + 64), dtype=FP8)[..., 32:32 + D]):
        args["k_cache"] = k
        with pytest.raises(ValueError) as info:
            call(args, descale_k=scale())
        _assert_reaches_device_check(info)


# ----------------------------------------------------------------------------------------------
# rejected
# ----------------------------------------------------------------------------------------------

# name: (fp8_args keywords, call keywords, exception, text the message must contain)
REJECTED = {
    # descale_k present exactly when the cache is FP8
    "fp8_cache_without_descale_k": (dict(), dict(), ValueError, "descale_k"),
    "fp8_cache_descale_k_none": (dict(), dict(descale_k=None), ValueError, "descale_k"),
    "bf16_cache_with_descale_k": (dict(k_dtype=BF16), dict(descale_k=scale()), ValueError, "descale_k"),
    "fp16_cache_with_descale_k": (dict(q_dtype=FP16, k_dtype=FP16), dict(descale_k=scale()), ValueError,
                                  "descale_k"),
    # descale_k: float32, shape (1,)
    "descale_k_float64": (dict(), dict(descale_k=scale(F64)), TypeError, "descale_k"),
    "descale_k_float16": (dict(), dict(descale_k=scale(FP16)), TypeError, "descale_k"),
    "descale_k_bfloat16": (dict(), dict(descale_k=scale(BF16)), TypeError, "descale_k"),
    "descale_k_int32": (dict(), dict(descale_k=scale(torch.int32)), TypeError, "descale_k"),
    "descale_k_fp8": (dict(), dict(descale_k=scale(FP8)), TypeError, "descale_k"),
    "descale_k_python_float": (dict(), dict(descale_k=0.5), TypeError, "descale_k"),
    "descale_k_0d": (dict(), dict(descale_k=scale(shape=())), ValueError, "descale_k"),
    "descale_k_2": (dict(), dict(descale_k=scale(shape=(2,))), ValueError, "descale_k"),
    "descale_k_1x1": (dict(), dict(descale_k=scale(shape=(1, 1))), ValueError, "descale_k"),
    "descale_k_empty": (dict(), dict(descale_k=scale(shape=(0,))), ValueError, "descale_k"),
    # descale_q present exactly when q is FP8
    "fp8_q_without_descale_q": (dict(q_dtype=FP8), dict(descale_k=scale()), ValueError, "descale_q"),
    "bf16_q_with_descale_q": (dict(), dict(descale_q=scale(), descale_k=scale()), ValueError, "descale_q"),
    "fp16_q_with_descale_q": (dict(q_dtype=FP16), dict(descale_q=scale(), descale_k=scale()), ValueError,
                              "descale_q"),
    "bf16_q_bf16_cache_with_descale_q": (dict(k_dtype=BF16), dict(descale_q=scale()), ValueError, "descale_q"),
    # descale_q: float32, shape (1,)
    "descale_q_float64": (dict(q_dtype=FP8), dict(descale_q=scale(F64), descale_k=scale()), TypeError,
                          "descale_q"),
    "descale_q_bfloat16": (dict(q_dtype=FP8), dict(descale_q=scale(BF16), descale_k=scale()), TypeError,
                           "descale_q"),
    "descale_q_int32": (dict(q_dtype=FP8), dict(descale_q=scale(torch.int32), descale_k=scale()), TypeError,
                        "descale_q"),
    "descale_q_0d": (dict(q_dtype=FP8), dict(descale_q=scale(shape=()), descale_k=scale()), ValueError,
                     "descale_q"),
    "descale_q_2": (dict(q_dtype=FP8), dict(descale_q=scale(shape=(2,)), descale_k=scale()), ValueError,
                    "descale_q"),
    "descale_q_1x1": (dict(q_dtype=FP8), dict(descale_q=scale(shape=(1, 1)), descale_k=scale()), ValueError,
                      "descale_q"),
    # dtypes of q and k_cache
    "fp8_q_bf16_cache": (dict(q_dtype=FP8, k_dtype=BF16), dict(descale_q=scale()), TypeError, "k_cache"),
    "fp8_q_fp16_cache": (dict(q_dtype=FP8, k_dtype=FP16), dict(descale_q=scale()), TypeError, "k_cache"),
    "bf16_q_fp16_cache": (dict(k_dtype=FP16), dict(), TypeError, "k_cache"),
    "float32_q_fp8_cache": (dict(q_dtype=F32), dict(descale_k=scale()), TypeError, r"(?<![A-Za-z])q(?![A-Za-z])"),
    "e5m2_q_fp8_cache": (dict(q_dtype=torch.float8_e5m2), dict(descale_q=scale(), descale_k=scale()), TypeError,
                         r"(?<![A-Za-z])q(?![A-Za-z])"),
    "bf16_q_e5m2_cache": (dict(k_dtype=torch.float8_e5m2), dict(descale_k=scale()), TypeError, "k_cache"),
    # shapes of an FP8 cache: as for 16-bit ones
    "fp8_cache_rank3": (dict(k_shape=(4 * 64, 1, D)), dict(descale_k=scale()), ValueError, "k_cache"),
    "fp8_cache_d512": (dict(k_shape=(4, 64, 1, 512)), dict(descale_k=scale()), ValueError, "k_cache"),
    "fp8_cache_h_kv3": (dict(k_shape=(4, 64, 3, D)), dict(descale_k=scale()), ValueError,
                        r"h_kv|h_q|num_heads"),
}


@pytest.mark.parametrize("make, kwargs, exc, match", list(REJECTED.values()), ids=list(REJECTED))
def test_fp8_rejected_arguments(make, kwargs, exc, match, path):
    args = fp8_args(**make)
    with pytest.raises(exc, match=match) as info:
        call(args, **kwargs)
    _assert_argument_error(info, exc)


OUT_REJECTED = {
    # (q dtype, out dtype)
    "q_fp8_out_fp16": (FP8, FP16),
    "q_fp8_out_fp8": (FP8, FP8),
    "q_fp8_out_float32": (FP8, F32),
    "q_bf16_out_fp16": (BF16, FP16),
    "q_bf16_out_fp8": (BF16, FP8),
    "q_fp16_out_bf16": (FP16, BF16),
}


@pytest.mark.parametrize("q_dtype, out_dtype", list(OUT_REJECTED.values()), ids=list(OUT_REJECTED))
def test_fp8_out_of_another_dtype_rejected(q_dtype, out_dtype, path):
    """out= must have the result's dtype: q's, bfloat16 for an FP8 q."""
    args = fp8_args(q_dtype=q_dtype)
    kwargs = dict(descale_k=scale(), out=out_of(args, out_dtype))
    if q_dtype == FP8:
        kwargs["descale_q"] = scale()
    with pytest.raises(TypeError, match="out"):
        call(args, **kwargs)


@pytest.mark.parametrize("kernel", ["sm90", "sm80_large", "sm80_small"])
def test_fp8_forced_kernel_reaches_device_check(kernel):
    """Every kernel takes FP8: a forced kernel with CPU tensors gets as far as the device check."""
    with pytest.raises(ValueError, match=CUDA):
        call(fp8_args(), descale_k=scale(), kernel=kernel)


# ----------------------------------------------------------------------------------------------
# is_fp8_kvcache (later FlashMLA's flag): declares the cache FP8, which may then be raw uint8
# bytes (as engines allocate it); an FP8 cache is recognised by its dtype without the flag
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k_dtype", [FP8, torch.uint8], ids=["fp8_cache", "uint8_cache"])
def test_is_fp8_kvcache_reaches_device_check(k_dtype, path):
    with pytest.raises(ValueError) as info:
        call(fp8_args(k_dtype=k_dtype), is_fp8_kvcache=True, descale_k=scale())
    _assert_reaches_device_check(info)


@pytest.mark.parametrize("make, kwargs, exc, match", [
    (dict(k_dtype=torch.uint8), dict(descale_k=scale()), TypeError, "k_cache"),
    (dict(k_dtype=torch.uint8), dict(is_fp8_kvcache=True), ValueError, "descale_k"),
    (dict(k_dtype=BF16), dict(is_fp8_kvcache=True, descale_k=scale()), TypeError, "is_fp8_kvcache|k_cache"),
], ids=["uint8_cache_without_flag", "flag_without_descale_k", "flag_with_bf16_cache"])
def test_is_fp8_kvcache_rejected(make, kwargs, exc, match, path):
    with pytest.raises(exc, match=match) as info:
        call(fp8_args(**make), **kwargs)
    _assert_argument_error(info, exc)


# ----------------------------------------------------------------------------------------------
# the scheduler object: a refused FP8 call leaves it unplanned
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(), ValueError, "descale_k"),
    (dict(descale_k=scale(F64)), TypeError, "descale_k"),
    (dict(descale_k=scale(), descale_q=scale()), ValueError, "descale_q"),
], ids=["no_descale_k", "descale_k_float64", "extra_descale_q"])
def test_fp8_sched_object_stays_empty_on_error(kwargs, exc, match):
    args = fp8_args()
    sched, _ = get_mla_metadata()
    args["tile_scheduler_metadata"], args["num_splits"] = sched, None
    with pytest.raises(exc, match=match):
        call(args, causal=True, **kwargs)
    assert sched.config is None and sched.tile_scheduler_metadata is None


@pytest.mark.parametrize("q_dtype", [BF16, FP8], ids=["q_bf16", "q_fp8"])
def test_fp8_sched_object_reaches_device_check(q_dtype):
    args = fp8_args(q_dtype=q_dtype, page=16)
    sched, _ = get_mla_metadata()
    args["tile_scheduler_metadata"], args["num_splits"] = sched, None
    with pytest.raises(ValueError) as info:
        call(args, causal=True, descale_k=scale(), descale_q=scale() if q_dtype == FP8 else None)
    _assert_reaches_device_check(info)
    assert sched.config is None


# ----------------------------------------------------------------------------------------------
# flash_mla.ops.mla_decode (DLPack: torch CPU tensors, host memory fails the device check last)
# ----------------------------------------------------------------------------------------------


def test_ops_mla_decode_descales_are_keyword_only():
    params = inspect.signature(flash_mla.ops.mla_decode).parameters
    for name in ("descale_q", "descale_k"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is None, name


def _ops_arrays(q_dtype=BF16, k_dtype=FP8, out_dtype=None, page=64):
    b, s_q, h_q, h_kv = 2, 1, 16, 1
    args = fp8_args(q_dtype=q_dtype, k_dtype=k_dtype, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, page=page)
    shapes = flash_mla.ops.workspace_shapes(b, s_q, h_q, h_kv, CPU_PARTS)
    if out_dtype is None:
        out_dtype = BF16 if q_dtype == FP8 else q_dtype
    return [args[n] for n in ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata",
                              "num_splits")] + [
        torch.zeros(shapes["out"], dtype=out_dtype), torch.zeros(shapes["lse"]),
        torch.zeros(shapes["o_accum"]), torch.zeros(shapes["lse_accum"])]


@pytest.mark.parametrize("q_dtype", [BF16, FP16, FP8], ids=["q_bf16", "q_fp16", "q_fp8"])
@pytest.mark.parametrize("page", [16, 256], ids=["page16", "page256"])
def test_ops_decode_fp8_reaches_device_check(q_dtype, page):
    kwargs = dict(descale_k=scale())
    if q_dtype == FP8:
        kwargs["descale_q"] = scale()
    with pytest.raises(ValueError) as info:
        flash_mla.ops.mla_decode(*_ops_arrays(q_dtype, page=page), causal=True, stream=0, **kwargs)
    _assert_reaches_device_check(info)


OPS_REJECTED = {
    "no_descale_k": (dict(), dict(), ValueError, "descale_k"),
    "descale_k_float64": (dict(), dict(descale_k=scale(F64)), TypeError, "descale_k"),
    "descale_k_2": (dict(), dict(descale_k=scale(shape=(2,))), ValueError, "descale_k"),
    "fp16_cache_with_descale_k": (dict(q_dtype=FP16, k_dtype=FP16), dict(descale_k=scale()), ValueError,
                                  "descale_k"),
    "fp8_q_without_descale_q": (dict(q_dtype=FP8), dict(descale_k=scale()), ValueError, "descale_q"),
    "bf16_q_with_descale_q": (dict(), dict(descale_q=scale(), descale_k=scale()), ValueError, "descale_q"),
    "fp8_q_bf16_cache": (dict(q_dtype=FP8, k_dtype=BF16), dict(descale_q=scale()), TypeError, "k_cache"),
    "fp8_q_out_fp16": (dict(q_dtype=FP8, out_dtype=FP16), dict(descale_q=scale(), descale_k=scale()), TypeError,
                       "out"),
    "bf16_q_fp8_cache_out_fp8": (dict(out_dtype=FP8), dict(descale_k=scale()), TypeError, "out"),
}


@pytest.mark.parametrize("make, kwargs, exc, match", list(OPS_REJECTED.values()), ids=list(OPS_REJECTED))
def test_ops_decode_fp8_rejected(make, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        flash_mla.ops.mla_decode(*_ops_arrays(**make), causal=True, stream=0, **kwargs)
    _assert_argument_error(info, exc)
