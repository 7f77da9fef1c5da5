"""torch-facing API: output and workspace allocation, streams, scheduler objects.

All argument checking happens in the compiled module (``flash_mla._C``), once per call and
before any launch; this file only allocates with torch and forwards.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from . import _C

HEAD_DIM = 576
HEAD_DIM_V = 512
META_INTS = 8

_KERNELS = {"auto": 0, "sm80_large": 1, "sm80_small": 2, "sm90": 3}


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _plan_into(cache_seqlens: torch.Tensor, rows_per_kv_head: int, num_heads_k: int):
    num_parts = _C.num_sm_parts(_num_sms(cache_seqlens.device.index), rows_per_kv_head, num_heads_k)
    batch = cache_seqlens.shape[0]
    meta = torch.empty((num_parts, META_INTS), dtype=torch.int32, device=cache_seqlens.device)
    splits = torch.empty((batch + 1,), dtype=torch.int32, device=cache_seqlens.device)
    _C.get_mla_metadata(cache_seqlens, meta, splits, _stream_of(cache_seqlens.device))
    return meta, splits


class FlashMLASchedMeta:
    """Scheduler state of the later-FlashMLA API: ``sched, _ = get_mla_metadata()``.

    Planned on the GPU by the first ``flash_mla_with_kvcache`` call that receives it, then
    reused. A later call with another batch size, s_q, h_q, h_kv, page size or causal flag
    raises ValueError (make a new object per configuration instead).
    """

    def __init__(self) -> None:
        self.tile_scheduler_metadata: Optional[torch.Tensor] = None
        self.num_splits: Optional[torch.Tensor] = None
        self.config: Optional[tuple] = None

    def __repr__(self) -> str:
        state = "empty" if self.config is None else f"planned for {self.config}"
        return f"FlashMLASchedMeta({state})"


def get_mla_metadata(
    cache_seqlens: Optional[torch.Tensor] = None,
    num_heads_per_head_k: Optional[int] = None,
    num_heads_k: Optional[int] = None,
    num_heads_q: Optional[int] = None,
    is_fp8_kvcache: bool = False,
    topk: Optional[int] = None,
    **kwargs,
):
    """Plans the split-KV schedule on the GPU (no host sync).

    Seed form: ``get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)`` returns
    ``(tile_scheduler_metadata, num_splits)``: int32 tensors of shapes ``(num_sm_parts, 8)``
    and ``(batch + 1,)`` on cache_seqlens' device. Reuse them for every layer of one decoding
    step (same cache_seqlens, same head counts).

    Later-FlashMLA form: ``get_mla_metadata()`` (or any call without cache_seqlens, as later
    releases accept) returns ``(FlashMLASchedMeta(), None)``, planned by its first use.
    ``num_q_tokens_per_head_k`` is accepted as an alias of ``num_heads_per_head_k`` and
    ``num_heads_q`` is ignored; ``is_fp8_kvcache=True`` and ``topk`` raise NotImplementedError.
    """
    if "num_q_tokens_per_head_k" in kwargs:
        if num_heads_per_head_k is not None:
            raise TypeError("get_mla_metadata(): give num_heads_per_head_k or num_q_tokens_per_head_k, not both")
        num_heads_per_head_k = kwargs.pop("num_q_tokens_per_head_k")
    _reject_unsupported(dict(kwargs, is_fp8_kvcache=is_fp8_kvcache, topk=topk), what="get_mla_metadata")
    if cache_seqlens is None:
        return FlashMLASchedMeta(), None
    if num_heads_per_head_k is None or num_heads_k is None:
        raise TypeError("get_mla_metadata() needs cache_seqlens, num_heads_per_head_k and num_heads_k")
    _C.check_metadata_args(cache_seqlens, num_heads_per_head_k, num_heads_k)
    return _plan_into(cache_seqlens, num_heads_per_head_k, num_heads_k)


# Keyword arguments of later FlashMLA releases for features this library does not build yet,
# with the value that means "feature off".
_UNSUPPORTED_DEFAULTS = {
    "is_fp8_kvcache": False,
    "indices": None,
    "attn_sink": None,
    "extra_k_cache": None,
    "extra_indices_in_kvcache": None,
    "topk_length": None,
    "extra_topk_length": None,
    "topk": None,
}


def _reject_unsupported(kwargs: dict, what: str) -> None:
    for name, value in kwargs.items():
        if name not in _UNSUPPORTED_DEFAULTS:
            raise TypeError(f"{what}() got an unexpected keyword argument '{name}'")
        default = _UNSUPPORTED_DEFAULTS[name]
        if value is not default and not (isinstance(value, bool) and value == default):
            raise NotImplementedError(f"{what}(): {name}={value!r} is not supported by flash-mla yet")


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata,
    num_splits: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
    *,
    kernel: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decoding attention over a paged KV cache.

    Args:
        q: (batch, s_q, h_q, 576), bf16 or fp16, last dim contiguous.
        k_cache: (num_blocks, 64, h_kv, 576), same dtype, last dim contiguous.
        block_table: (batch, max_blocks_per_seq) int32.
        cache_seqlens: (batch,) int32, may hold zeros.
        head_dim_v: must be 512.
        tile_scheduler_metadata, num_splits: from ``get_mla_metadata``; or a
            ``FlashMLASchedMeta`` and None.
        softmax_scale: defaults to 1/sqrt(576).
        causal: mask query token t of s_q to keys 0 .. L - s_q + t.
        is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
            topk_length, extra_topk_length: later-FlashMLA features, not built yet: they
            raise NotImplementedError unless left at their defaults.
        kernel (keyword only): "auto" (default: "sm90" on Hopper, else the portable kernel), or
            "sm90" / "sm80_large" / "sm80_small" to force a path.

    Returns:
        out (batch, s_q, h_q, 512) in q's dtype and lse (batch, h_q, s_q) float32
        (natural log; +inf and out = 0 for rows that see no key).
    """
    _reject_unsupported(dict(is_fp8_kvcache=is_fp8_kvcache, indices=indices, attn_sink=attn_sink,
                             extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
                             topk_length=topk_length, extra_topk_length=extra_topk_length),
                        what="flash_mla_with_kvcache")
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        tile_scheduler_metadata, num_splits = _plan_sched(
            tile_scheduler_metadata, q, k_cache, cache_seqlens, causal)
    elif num_splits is None:
        raise ValueError("num_splits: None is only valid with a FlashMLASchedMeta from get_mla_metadata(); "
                         "pass the num_splits returned together with tile_scheduler_metadata")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(HEAD_DIM)
    shapes = _C.check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                    tile_scheduler_metadata, num_splits, float(softmax_scale))
    batch, seqlen_q, heads_q, heads_kv, workspace_splits = shapes
    device = q.device
    out = torch.empty((batch, seqlen_q, heads_q, HEAD_DIM_V), dtype=q.dtype, device=device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=device)
    rows = seqlen_q * heads_q  # = h_kv * rows_per_kv_head
    o_accum = torch.empty((workspace_splits, rows, HEAD_DIM_V), dtype=torch.float32, device=device)
    lse_accum = torch.empty((workspace_splits, rows), dtype=torch.float32, device=device)
    _C.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                  num_splits, out, lse, o_accum, lse_accum, float(softmax_scale), bool(causal),
                  _KERNELS[kernel], _stream_of(device))
    return out, lse


def _plan_sched(sched: FlashMLASchedMeta, q, k_cache, cache_seqlens, causal):
    if not (isinstance(q, torch.Tensor) and q.dim() == 4 and isinstance(k_cache, torch.Tensor)
            and k_cache.dim() == 4 and isinstance(cache_seqlens, torch.Tensor)):
        raise ValueError("q and k_cache must be 4-D tensors and cache_seqlens a tensor")
    batch, seqlen_q, heads_q, _ = q.shape
    page, heads_kv = k_cache.shape[1], k_cache.shape[2]
    config = (batch, seqlen_q, heads_q, page, heads_kv, bool(causal))
    if sched.config is None:
        if heads_kv <= 0 or heads_q % heads_kv != 0:
            raise ValueError(f"h_q ({heads_q}) must be a multiple of h_kv ({heads_kv})")
        rows = seqlen_q * heads_q // heads_kv
        _C.check_metadata_args(cache_seqlens, rows, heads_kv)
        sched.tile_scheduler_metadata, sched.num_splits = _plan_into(cache_seqlens, rows, heads_kv)
        sched.config = config
    elif sched.config != config:
        names = ("batch", "s_q", "h_q", "page_block_size", "h_kv", "causal")
        diff = ", ".join(f"{n}: {a} -> {b}" for n, a, b in zip(names, sched.config, config) if a != b)
        raise ValueError(f"FlashMLASchedMeta was planned for another configuration ({diff}); "
                         "create a new one with get_mla_metadata()")
    return sched.tile_scheduler_metadata, sched.num_splits


def host_plan(cache_seqlens, num_heads_per_head_k: int, num_heads_k: int, num_sms: int):
    """The scheduler's plan computed on the CPU (the reference of the GPU metadata kernel).

    Returns ``(tile_scheduler_metadata, num_splits)`` as lists of ints (rows of 8, and b + 1).
    """
    seqlens = [int(x) for x in cache_seqlens]
    parts = _C.num_sm_parts(num_sms, num_heads_per_head_k, num_heads_k)
    return _C.host_plan(seqlens, parts)


def kernel_for_device(device=None, kernel: str = "auto") -> str:
    """Name of the decode kernel that runs on ``device`` for the given choice."""
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
    index = torch.device(device if device is not None else "cuda").index
    if index is None:
        index = torch.cuda.current_device()
    return _C.kernel_name(index, _KERNELS[kernel])
