"""torch side of the API: the direct eager path and the torch.library custom ops (``flash_mla``).

Eager calls (nothing tracing: no torch.compile, no FakeTensor / dispatch mode, no functorch
transform; see ``eager_direct``) go straight to the compiled module: ``decode`` and
``metadata`` hand the tensors to ``flash_mla._C.torch_decode`` / ``torch_get_mla_metadata``,
which read shapes, strides, dtypes, devices and data pointers from the tensors' attributes
(no DLPack export), check every argument once, and only then call back into ``_prepare_*`` to
allocate the missing outputs and the workspace with torch (graph-pool aware under capture) and
to get the current stream of q's device. Those entry points answer None for arguments that are
not plain tensors; the caller then takes the custom-op path, whose checks and messages are the
same.

The custom ops (the path under torch.compile, torch.export, make_fx and FakeTensorMode):

    torch.ops.flash_mla.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
        -> (tile_scheduler_metadata, num_splits)
    torch.ops.flash_mla.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v,
        tile_scheduler_metadata, num_splits, softmax_scale, causal, kernel, descale_q, descale_k)
        -> (out, lse)
    torch.ops.flash_mla.mla_decode_out(..., num_splits, out, lse, softmax_scale, causal, kernel,
        descale_q, descale_k) -> None, writes out and lse
    torch.ops.flash_mla.sparse_decode(q, k_cache, indices, topk_length, extra_k_cache,
        extra_indices, extra_topk_length, attn_sink, head_dim_v, softmax_scale, is_fp8,
        plan_seqlens, tile_scheduler_metadata, num_splits, kernel) -> (out, lse as (b, s_q, h_q))

(descale_q / descale_k: None, or the float32 (1,) descales of an FP8 q / k_cache.)

Each has a fake (meta) implementation giving the output shapes, so torch.compile (also with
fullgraph=True), torch.export, make_fx and FakeTensorMode trace through the public functions
without graph breaks. Their real implementations run the same compiled entry points as the
direct path.

Setting the environment variable ``FLASH_MLA_CUSTOM_OP_ONLY=1`` before import (or
``flash_mla._torch_ops.DIRECT_EAGER = False`` at run time) sends eager calls through the custom
ops too (for measuring the dispatch cost, or for tools that must see every op).

This module is imported by ``flash_mla.interface``; with torch < 2.4 (no
``torch.library.custom_op``) the custom-op names are plain functions (eager only).
"""

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from . import _C
from .ops import HEAD_DIM_V, INPUT_CHECK_WORDS, META_INTS, input_check_error

# SM count assumed by the fake metadata op for fake CUDA tensors on a machine without a GPU
# (shape propagation only: nothing runs there).
_FAKE_NUM_SMS = 132

# torch._C._to_dlpack exports a tensor's shape, strides, dtype, device and data pointer in one
# C call (Tensor.__dlpack__ adds a slow Python layer); without it the compiled module reads the
# tensors' attributes. FLASH_MLA_TENSOR_READ=attributes forces the latter.
_TO_DLPACK = getattr(torch._C, "_to_dlpack", None)
if os.environ.get("FLASH_MLA_TENSOR_READ", "") == "attributes":
    _TO_DLPACK = None
_C.torch_setup(torch.Tensor, torch.nn.Parameter, torch.bfloat16, torch.float16, torch.float32, torch.int32,
               torch.int64, _TO_DLPACK, getattr(torch, "float8_e4m3fn", None))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# torch's current stream as a raw handle: torch._C._cuda_getCurrentRawStream (what compiled
# code uses) where it exists, else the public (slower) torch.cuda.current_stream().
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device_index: int) -> int:
    """Handle of torch's current CUDA stream on device ``device_index``."""
    if _raw_stream is not None:
        return _raw_stream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def stream_of(device: torch.device) -> int:
    """Handle of torch's current CUDA stream on ``device``."""
    return current_stream_handle(device.index if device.index is not None else torch.cuda.current_device())


def _fake_num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return _FAKE_NUM_SMS


# ----------------------------------------------------------------------------------------------
# the direct eager path
# ----------------------------------------------------------------------------------------------

DIRECT_EAGER = os.environ.get("FLASH_MLA_CUSTOM_OP_ONLY", "") in ("", "0")

try:
    _is_compiling = torch.compiler.is_compiling
except AttributeError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def eager_direct(t) -> bool:
    """True when a call with first tensor ``t`` may bypass torch.library dispatch: plain eager
    execution (torch.compile / export not tracing, no TorchDispatchMode such as FakeTensorMode
    or make_fx's proxy mode, no vmap / grad transform) on a plain, non-meta tensor."""
    return (DIRECT_EAGER and not _is_compiling() and type(t) is Tensor and not t.is_meta
            and not _dispatch_modes() and not _functorch_active())


_float32, _int32, _bfloat16 = torch.float32, torch.int32, torch.bfloat16
_FP8 = getattr(torch, "float8_e4m3fn", None)


def out_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """dtype of out for a q of ``q_dtype``: q's own, bfloat16 for an FP8 q."""
    return _bfloat16 if q_dtype == _FP8 else q_dtype


def _prepare_decode(q: Tensor, out: Optional[Tensor], lse: Optional[Tensor], batch: int, seqlen_q: int,
                    heads_q: int, workspace_splits: int, device_index: int):
    """Called back by _C.torch_decode once every argument is checked: the missing outputs, the
    split workspace (o_accum then lse_accum, one float32 buffer), all on q's device (cuda:
    ``device_index``), and the stream. (new_empty: q's device and dtype without parsing them.)"""
    if out is None:
        out = q.new_empty((batch, seqlen_q, heads_q, HEAD_DIM_V), dtype=out_dtype(q.dtype))
    if lse is None:
        lse = q.new_empty((batch, heads_q, seqlen_q), dtype=_float32)
    workspace = q.new_empty((workspace_splits * seqlen_q * heads_q * (HEAD_DIM_V + 1),), dtype=_float32)
    return out, lse, workspace, current_stream_handle(device_index)


def _prepare_sparse(q: Tensor, out: Optional[Tensor], lse: Optional[Tensor], batch: int, seqlen_q: int,
                    heads_q: int, workspace_splits: int, device_index: int):
    """_prepare_decode for the token-sparse call, whose lse is written as (batch, s_q, h_q) memory
    (returned as its (batch, h_q, s_q) view)."""
    if out is None:
        out = q.new_empty((batch, seqlen_q, heads_q, HEAD_DIM_V), dtype=_bfloat16)
    if lse is None:
        lse = q.new_empty((batch, seqlen_q, heads_q), dtype=_float32).transpose(1, 2)
    workspace = q.new_empty((workspace_splits * heads_q * (HEAD_DIM_V + 1),), dtype=_float32)
    return out, lse, workspace, current_stream_handle(device_index)


def sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length, attn_sink,
                  head_dim_v: int, softmax_scale: float, is_fp8: bool, plan_seqlens, meta, splits, kernel: int,
                  out=None, lse=None):
    """(out, lse) of one token-sparse decode call (the checks, allocation and launch in one call)."""
    return _C.torch_sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                                  attn_sink, head_dim_v, softmax_scale, is_fp8, plan_seqlens, meta, splits, out, lse,
                                  kernel, _prepare_sparse)


def check_sparse(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length, attn_sink,
                 head_dim_v: int, softmax_scale: float, is_fp8: bool, out=None, lse=None):
    """Every check of sparse_decode (devices included; lse's memory layout excepted) without a
    launch: (batch, s_q, h_q, keys per query token)."""
    return _C.torch_sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                                  attn_sink, head_dim_v, softmax_scale, is_fp8, None, None, None, out, lse, 0, None)


def _prepare_metadata(cache_seqlens: Tensor, parts: int, batch: int, device_index: int):
    meta = cache_seqlens.new_empty((parts, META_INTS), dtype=_int32)
    splits = cache_seqlens.new_empty((batch + 1,), dtype=_int32)
    return meta, splits, current_stream_handle(device_index)


def decode(q, k_cache, block_table, cache_seqlens, head_dim_v: int, meta, splits, softmax_scale: float,
           causal: bool, kernel: int, out=None, lse=None, descale_q=None, descale_k=None):
    """(out, lse) of one decode call, or None when an argument is not a plain torch.Tensor.
    ``out`` / ``lse``: preallocated outputs or None (allocated here after the checks)."""
    return _C.torch_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse,
                           softmax_scale, causal, kernel, _prepare_decode, descale_q, descale_k)


def metadata(cache_seqlens, num_heads_per_head_k: int, num_heads_k: int):
    """(tile_scheduler_metadata, num_splits), or None when cache_seqlens is not a plain tensor."""
    return _C.torch_get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k, _prepare_metadata)


def _not_plain(what: str):
    return TypeError(f"{what}: expected plain torch.Tensor arguments")


# ----------------------------------------------------------------------------------------------
# real implementations of the custom ops: the same entry points
# ----------------------------------------------------------------------------------------------


def _metadata_impl(cache_seqlens: Tensor, num_heads_per_head_k: int, num_heads_k: int):
    result = metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
    if result is None:
        raise _not_plain("get_mla_metadata")
    return result


def _decode_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale, causal,
                 kernel, descale_q=None, descale_k=None):
    result = decode(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale, causal,
                    kernel, None, None, descale_q, descale_k)
    if result is None:
        raise _not_plain("flash_mla_with_kvcache")
    return result


def _decode_out_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, softmax_scale,
                     causal, kernel, descale_q=None, descale_k=None):
    result = decode(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale, causal,
                    kernel, out, lse, descale_q, descale_k)
    if result is None:
        raise _not_plain("flash_mla_with_kvcache")


# ----------------------------------------------------------------------------------------------
# fake implementations (output shapes only)
# ----------------------------------------------------------------------------------------------


def _fake_check(q: Tensor, **others: Optional[Tensor]) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims (batch, s_q, h_q, 576), got shape {tuple(q.shape)}")
    for name, t in others.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: is on {t.device} but q is on {q.device}")


def _metadata_fake(cache_seqlens, num_heads_per_head_k, num_heads_k):
    if cache_seqlens.dim() != 1:
        raise ValueError(f"cache_seqlens: expected 1 dim (batch,), got shape {tuple(cache_seqlens.shape)}")
    # int(): head counts are model constants; a symbolic one is specialised (a guard).
    parts = _C.num_sm_parts(_fake_num_sms(cache_seqlens.device), int(num_heads_per_head_k), int(num_heads_k))
    meta = cache_seqlens.new_empty((parts, META_INTS), dtype=torch.int32)
    splits = cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32)
    return meta, splits


def _decode_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale, causal, kernel,
                 descale_q=None, descale_k=None):
    _fake_check(q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                tile_scheduler_metadata=meta, num_splits=splits, descale_q=descale_q, descale_k=descale_k)
    batch, seqlen_q, heads_q, _ = q.shape
    return (q.new_empty((batch, seqlen_q, heads_q, HEAD_DIM_V), dtype=out_dtype(q.dtype)),
            q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32))


def _decode_out_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, softmax_scale,
                     causal, kernel, descale_q=None, descale_k=None):
    _fake_check(q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                tile_scheduler_metadata=meta, num_splits=splits, out=out, lse=lse, descale_q=descale_q,
                descale_k=descale_k)
    return None


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------

HAS_CUSTOM_OPS = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")

if HAS_CUSTOM_OPS:

    @torch.library.custom_op("flash_mla::get_mla_metadata", mutates_args=())
    def get_mla_metadata(cache_seqlens: Tensor, num_heads_per_head_k: int,
                         num_heads_k: int) -> tuple[Tensor, Tensor]:
        return _metadata_impl(cache_seqlens, num_heads_per_head_k, num_heads_k)

    @torch.library.custom_op("flash_mla::mla_decode", mutates_args=())
    def mla_decode(q: Tensor, k_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
                   tile_scheduler_metadata: Tensor, num_splits: Tensor, softmax_scale: float, causal: bool,
                   kernel: int, descale_q: Optional[Tensor] = None,
                   descale_k: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        return _decode_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                            num_splits, softmax_scale, causal, kernel, descale_q, descale_k)

    @torch.library.custom_op("flash_mla::mla_decode_out", mutates_args=("out", "lse"))
    def mla_decode_out(q: Tensor, k_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
                       tile_scheduler_metadata: Tensor, num_splits: Tensor, out: Tensor, lse: Tensor,
                       softmax_scale: float, causal: bool, kernel: int, descale_q: Optional[Tensor] = None,
                       descale_k: Optional[Tensor] = None) -> None:
        _decode_out_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                         out, lse, softmax_scale, causal, kernel, descale_q, descale_k)

    @torch.library.custom_op("flash_mla::sparse_decode", mutates_args=())
    def sparse_decode_op(q: Tensor, k_cache: Tensor, indices: Tensor, topk_length: Optional[Tensor],
                         extra_k_cache: Optional[Tensor], extra_indices: Optional[Tensor],
                         extra_topk_length: Optional[Tensor], attn_sink: Optional[Tensor], head_dim_v: int,
                         softmax_scale: float, is_fp8: bool, plan_seqlens: Tensor, tile_scheduler_metadata: Tensor,
                         num_splits: Tensor, kernel: int) -> tuple[Tensor, Tensor]:
        out, lse = sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                                 attn_sink, head_dim_v, softmax_scale, is_fp8, plan_seqlens,
                                 tile_scheduler_metadata, num_splits, kernel)
        return out, lse.transpose(1, 2)  # an op's outputs are fresh tensors: (batch, s_q, h_q)

    @sparse_decode_op.register_fake
    def _sparse_decode_fake(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                            attn_sink, head_dim_v, softmax_scale, is_fp8, plan_seqlens, tile_scheduler_metadata,
                            num_splits, kernel):
        _fake_check(q, k_cache=k_cache, indices=indices, plan_seqlens=plan_seqlens)
        batch, seqlen_q, heads_q, _ = q.shape
        return (q.new_empty((batch, seqlen_q, heads_q, HEAD_DIM_V), dtype=torch.bfloat16),
                q.new_empty((batch, seqlen_q, heads_q), dtype=torch.float32))

    get_mla_metadata.register_fake(_metadata_fake)
    mla_decode.register_fake(_decode_fake)
    mla_decode_out.register_fake(_decode_out_fake)

else:  # torch < 2.4: eager only
    def sparse_decode_op(*args):
        out, lse = sparse_decode(*args)
        return out, lse.transpose(1, 2)

    get_mla_metadata = _metadata_impl
    mla_decode = _decode_impl
    mla_decode_out = _decode_out_impl


# ----------------------------------------------------------------------------------------------
# opt-in device-side validation (eager only: it reads the verdict back to the host)
# ----------------------------------------------------------------------------------------------


def check_inputs_on_device(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits,
                           softmax_scale: float, descale_q=None, descale_k=None) -> None:
    """Raises ValueError when a used block_table entry is not a page of k_cache or a
    cache_seqlens value is outside [0, page_size * max_blocks_per_seq] (page_size: dim 1 of
    k_cache). Synchronises with the host."""
    _C.torch_check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale,
                          descale_q=descale_q, descale_k=descale_k)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("check_inputs=True reads its verdict back to the host and cannot run during CUDA "
                           "graph capture: check the inputs before capturing, or leave check_inputs=False")
    num_blocks, page_size, max_blocks = k_cache.shape[0], k_cache.shape[1], block_table.shape[1]
    result = torch.empty((INPUT_CHECK_WORDS,), dtype=torch.int64, device=q.device)
    _C.check_paged_inputs(block_table, cache_seqlens, num_blocks, result, stream_of(q.device), page_size)
    message: Optional[str] = input_check_error(result.tolist(), num_blocks, max_blocks, page_size=page_size)
    if message is not None:
        raise ValueError(f"check_inputs: {message}")
