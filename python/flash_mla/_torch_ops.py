"""torch.library custom ops behind the torch API (namespace ``flash_mla``).

    torch.ops.flash_mla.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
        -> (tile_scheduler_metadata, num_splits)
    torch.ops.flash_mla.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v,
        tile_scheduler_metadata, num_splits, softmax_scale, causal, kernel) -> (out, lse)
    torch.ops.flash_mla.mla_decode_out(..., num_splits, out, lse, softmax_scale, causal, kernel)
        -> None, writes out and lse

Each has a fake (meta) implementation giving the output shapes, so torch.compile (also with
fullgraph=True), torch.export, make_fx and FakeTensorMode trace through the public functions
without graph breaks. The real implementations check everything in flash_mla._C and launch on
the current stream; the workspace is allocated with torch (graph-pool aware under capture).

This module is imported by ``flash_mla.interface``; with torch < 2.4 (no
``torch.library.custom_op``) the same names are plain functions (eager only).
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _C
from .ops import HEAD_DIM_V, INPUT_CHECK_WORDS, META_INTS, input_check_error

# SM count assumed by the fake metadata op for fake CUDA tensors on a machine without a GPU
# (shape propagation only: nothing runs there).
_FAKE_NUM_SMS = 132


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _fake_num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return _FAKE_NUM_SMS


# ----------------------------------------------------------------------------------------------
# real implementations
# ----------------------------------------------------------------------------------------------


def _metadata_impl(cache_seqlens: Tensor, num_heads_per_head_k: int, num_heads_k: int):
    _C.check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k)
    device = cache_seqlens.device
    parts = _C.num_sm_parts(num_sms(device.index), num_heads_per_head_k, num_heads_k)
    meta = torch.empty((parts, META_INTS), dtype=torch.int32, device=device)
    splits = torch.empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32, device=device)
    _C.get_mla_metadata(cache_seqlens, meta, splits, stream_of(device))
    return meta, splits


def _launch(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, softmax_scale,
            causal, kernel, shapes):
    _, seqlen_q, heads_q, _, workspace_splits = shapes
    rows = seqlen_q * heads_q
    o_accum = torch.empty((workspace_splits, rows, HEAD_DIM_V), dtype=torch.float32, device=q.device)
    lse_accum = torch.empty((workspace_splits, rows), dtype=torch.float32, device=q.device)
    stream = stream_of(q.device) if q.device.type == "cuda" else 0  # else _C raises (device check)
    _C.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, o_accum,
                  lse_accum, softmax_scale, causal, kernel, stream)


def _decode_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale, causal,
                 kernel):
    shapes = _C.check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits,
                                    softmax_scale)
    batch, seqlen_q, heads_q = shapes[:3]
    out = torch.empty((batch, seqlen_q, heads_q, HEAD_DIM_V), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    _launch(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, softmax_scale, causal,
            kernel, shapes)
    return out, lse


def _decode_out_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, softmax_scale,
                     causal, kernel):
    # Devices are checked by _C.mla_decode, after the shapes of out / lse (testable on the CPU).
    shapes = _C.check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits,
                                    softmax_scale, False)
    _launch(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, softmax_scale, causal,
            kernel, shapes)


# ----------------------------------------------------------------------------------------------
# fake implementations (output shapes only)
# ----------------------------------------------------------------------------------------------


def _fake_check(q: Tensor, **others: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims (batch, s_q, h_q, 576), got shape {tuple(q.shape)}")
    for name, t in others.items():
        if t.device != q.device:
            raise ValueError(f"{name}: is on {t.device} but q is on {q.device}")


def _metadata_fake(cache_seqlens, num_heads_per_head_k, num_heads_k):
    if cache_seqlens.dim() != 1:
        raise ValueError(f"cache_seqlens: expected 1 dim (batch,), got shape {tuple(cache_seqlens.shape)}")
    # int(): head counts are model constants; a symbolic one is specialised (a guard).
    parts = _C.num_sm_parts(_fake_num_sms(cache_seqlens.device), int(num_heads_per_head_k), int(num_heads_k))
    meta = cache_seqlens.new_empty((parts, META_INTS), dtype=torch.int32)
    splits = cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32)
    return meta, splits


def _decode_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale, causal, kernel):
    _fake_check(q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                tile_scheduler_metadata=meta, num_splits=splits)
    batch, seqlen_q, heads_q, _ = q.shape
    return (q.new_empty((batch, seqlen_q, heads_q, HEAD_DIM_V)),
            q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32))


def _decode_out_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, out, lse, softmax_scale,
                     causal, kernel):
    _fake_check(q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                tile_scheduler_metadata=meta, num_splits=splits, out=out, lse=lse)
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
                   kernel: int) -> tuple[Tensor, Tensor]:
        return _decode_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                            num_splits, softmax_scale, causal, kernel)

    @torch.library.custom_op("flash_mla::mla_decode_out", mutates_args=("out", "lse"))
    def mla_decode_out(q: Tensor, k_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
                       tile_scheduler_metadata: Tensor, num_splits: Tensor, out: Tensor, lse: Tensor,
                       softmax_scale: float, causal: bool, kernel: int) -> None:
        _decode_out_impl(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                         out, lse, softmax_scale, causal, kernel)

    get_mla_metadata.register_fake(_metadata_fake)
    mla_decode.register_fake(_decode_fake)
    mla_decode_out.register_fake(_decode_out_fake)

else:  # torch < 2.4: eager only
    get_mla_metadata = _metadata_impl
    mla_decode = _decode_impl
    mla_decode_out = _decode_out_impl


# ----------------------------------------------------------------------------------------------
# opt-in device-side validation (eager only: it reads the verdict back to the host)
# ----------------------------------------------------------------------------------------------


def check_inputs_on_device(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits,
                           softmax_scale: float) -> None:
    """Raises ValueError when a used block_table entry is not a page of k_cache or a
    cache_seqlens value is outside [0, 64 * max_blocks_per_seq]. Synchronises with the host."""
    _C.check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits, softmax_scale)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("check_inputs=True reads its verdict back to the host and cannot run during CUDA "
                           "graph capture: check the inputs before capturing, or leave check_inputs=False")
    num_blocks, max_blocks = k_cache.shape[0], block_table.shape[1]
    result = torch.empty((INPUT_CHECK_WORDS,), dtype=torch.int64, device=q.device)
    _C.check_paged_inputs(block_table, cache_seqlens, num_blocks, result, stream_of(q.device))
    message: Optional[str] = input_check_error(result.tolist(), num_blocks, max_blocks)
    if message is not None:
        raise ValueError(f"check_inputs: {message}")
