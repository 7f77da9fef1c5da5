"""torch-facing API: output and workspace allocation, streams, scheduler objects.

Tensor checks happen in the compiled module (``flash_mla._C``), once per call and before any
launch; this file checks the scalar arguments and forwards. Eager calls go straight to the
compiled module (``_torch_ops.decode`` / ``_torch_ops.metadata``: one call that checks,
allocates with torch and launches); under torch.compile, torch.export, make_fx,
FakeTensorMode or a functorch transform they go through the torch.library custom ops of
``_torch_ops`` instead (see ``_torch_ops.eager_direct``). Both are CUDA-graph friendly.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch

from . import _C
from . import _torch_ops
from .ops import check_sparse_kernel

HEAD_DIM = 576
HEAD_DIM_V = 512
META_INTS = 8

_KERNELS = {"auto": 0, "sm80_large": 1, "sm80_small": 2, "sm90": 3}
DEFAULT_SOFTMAX_SCALE = 1.0 / math.sqrt(HEAD_DIM)

_Tensor = torch.Tensor


def _int_arg(value, name: str):
    """An int argument: bool, float, str, None ... raise a TypeError naming it. SymInts (shapes
    under torch.compile with dynamic shapes) pass through."""
    if type(value) is int:
        return value
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError as exc:  # e.g. a float tensor, which has __index__ but refuses it
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}: {exc}") from None


def _head_count(value, name: str):
    """A head count of get_mla_metadata: an int in [1, 2^30] (TypeError / ValueError naming it)."""
    value = _int_arg(value, name)
    if type(value) is int and not 0 < value <= 1 << 30:
        raise ValueError(f"{name}: must be a positive int, got {value}")
    return value


def _scale_of(softmax_scale) -> float:
    """softmax_scale as a float: numbers (Python, NumPy, 0-d tensors) accepted; bool, str and
    other types raise a TypeError. Finiteness and sign are checked in the compiled module."""
    if softmax_scale is None:
        return DEFAULT_SOFTMAX_SCALE
    if isinstance(softmax_scale, (bool, str, bytes, complex)) or not hasattr(type(softmax_scale), "__float__"):
        raise TypeError(f"softmax_scale: expected a float, got {type(softmax_scale).__name__}")
    try:
        return float(softmax_scale)
    except OverflowError:
        raise ValueError(f"softmax_scale: must be finite and > 0, got {softmax_scale!r}") from None
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor of several elements
        raise TypeError(f"softmax_scale: expected a float, got {type(softmax_scale).__name__}: {exc}") from None


def _bool_of(value, name: str) -> bool:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


class FlashMLASchedMeta:
    """Scheduler state of the later-FlashMLA API: ``sched, _ = get_mla_metadata()``.

    Planned on the GPU by the first ``flash_mla_with_kvcache`` call that receives it, then
    reused. A later call with another batch size, s_q, h_q, h_kv, page size or causal flag
    raises ValueError (make a new object per configuration instead).
    """

    def __init__(self) -> None:
        self.tile_scheduler_metadata: Optional[torch.Tensor] = None
        self.num_splits: Optional[torch.Tensor] = None
        self.plan_seqlens: Optional[torch.Tensor] = None  # token-sparse calls: keys per query token
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
    ``num_heads_q`` and ``is_fp8_kvcache`` are ignored (the plan does not depend on them). With
    ``topk`` (the token-sparse form of earlier releases) the result is ``(FlashMLASchedMeta(),
    None)`` too, planned by the first token-sparse call.
    """
    if kwargs:
        if "num_q_tokens_per_head_k" in kwargs:
            if num_heads_per_head_k is not None:
                raise TypeError("get_mla_metadata(): give num_heads_per_head_k or num_q_tokens_per_head_k, not both")
            num_heads_per_head_k = kwargs.pop("num_q_tokens_per_head_k")
        _reject_unsupported(kwargs, what="get_mla_metadata")
    if cache_seqlens is None or topk is not None:
        # A token-sparse plan (topk) depends on the call's shapes: planned by its first use.
        return FlashMLASchedMeta(), None
    if num_heads_per_head_k is None or num_heads_k is None:
        raise TypeError("get_mla_metadata() needs cache_seqlens, num_heads_per_head_k and num_heads_k")
    num_heads_per_head_k = _head_count(num_heads_per_head_k, "num_heads_per_head_k")
    num_heads_k = _head_count(num_heads_k, "num_heads_k")
    if _torch_ops.eager_direct(cache_seqlens):
        result = _torch_ops.metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
        if result is not None:
            return result
    _require_tensors(cache_seqlens=cache_seqlens)
    return _torch_ops.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)


def _require_tensors(**tensors) -> None:
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__} "
                            "(flash_mla.ops takes arrays of any DLPack framework)")


# Keyword arguments of the decode call that get_mla_metadata() accepts only at their "feature
# off" value (passed to the planner by mistake: they belong to flash_mla_with_kvcache).
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
        # False-like flags (0, numpy.False_) count as "off"; None-defaults must stay None.
        off = value is None if default is None else not bool(value)
        if not off:
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
    descale_q: Optional[torch.Tensor] = None,
    descale_k: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    check_inputs: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decoding attention over a paged KV cache.

    Args:
        q: (batch, s_q, h_q, 576), bf16 or fp16, last dim contiguous; or float8_e4m3fn with
            ``descale_q`` and an FP8 k_cache.
        k_cache: (num_blocks, page_block_size, h_kv, 576), q's dtype or float8_e4m3fn (with
            ``descale_k``), last dim contiguous; page_block_size 16, 32, 64, 128 or 256 (token j
            of request i is ``k_cache[block_table[i, j // page_block_size], j % page_block_size]``).
        block_table: (batch, max_blocks_per_seq) int32.
        cache_seqlens: (batch,) int32, may hold zeros.
        head_dim_v: must be 512.
        tile_scheduler_metadata, num_splits: from ``get_mla_metadata``; or a
            ``FlashMLASchedMeta`` and None.
        softmax_scale: defaults to 1/sqrt(576).
        causal: mask query token t of s_q to keys 0 .. L - s_q + t.
        is_fp8_kvcache: True declares an FP8 cache; it may then also be given as uint8 bytes
            (viewed as float8_e4m3fn). An FP8 cache is recognised by its dtype without it.
        indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
            extra_topk_length: the token-sparse form (DeepSeek-V3.2): see docs/api.md,
            "Token-sparse decode". With ``indices`` (int32 (batch, s_q, topk)), block_table and
            cache_seqlens are None, k_cache is (num_blocks, page, 1, record) of one of the
            token-sparse formats (bf16 with is_fp8_kvcache=False; V3.2 656-byte or 512-dim
            584-byte records with is_fp8_kvcache=True), and lse is returned as a
            (batch, h_q, s_q) view of (batch, s_q, h_q) memory.
        descale_q, descale_k (keyword only, vLLM's names): float32 tensors of shape (1,) on q's
            device, read by the kernel (no host sync; a CUDA graph replays with their current
            values). ``descale_k`` is required with an FP8 cache and K/V are then
            ``float(k_cache) * descale_k``; ``descale_q`` likewise with an FP8 q. Each is an
            error with a 16-bit input. ``flash_mla.kv_formats.quantize_kv_cache_fp8`` makes both
            the cache and its descale.
        kernel (keyword only): "auto" (default: "sm90" on Hopper, else the portable kernel), or
            "sm90" / "sm80_large" / "sm80_small" to force a path.
        out, lse (keyword only): preallocated outputs, (batch, s_q, h_q, 512) in q's dtype
            (bfloat16 for an FP8 q) and
            (batch, h_q, s_q) float32, contiguous, on q's device (checked); returned as given.
            Either may be given alone (the other is allocated).
        check_inputs (keyword only): validate on the GPU that cache_seqlens are in
            [0, page_block_size * max_blocks_per_seq] and the used block_table entries in [0, num_blocks)
            and raise ValueError otherwise. Synchronises with the host: eager only (not during
            CUDA-graph capture; a graph break under torch.compile). Off by default.

    Returns:
        out (batch, s_q, h_q, 512) in q's dtype (bfloat16 for an FP8 q) and lse (batch, h_q, s_q) float32
        (natural log; +inf and out = 0 for rows that see no key).
    """
    if indices is not None:
        return _sparse_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                              num_splits, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
                              extra_indices_in_kvcache, topk_length, extra_topk_length, descale_q, descale_k,
                              kernel, out, lse)
    for name, value in (("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                        ("extra_indices_in_kvcache", extra_indices_in_kvcache), ("topk_length", topk_length),
                        ("extra_topk_length", extra_topk_length)):
        if value is not None:
            raise ValueError(f"{name}: only valid with indices (token-sparse decode)")
    if is_fp8_kvcache is not False and _bool_of(is_fp8_kvcache, "is_fp8_kvcache"):
        k_cache = _fp8_cache_view(k_cache)
    kernel_id = _KERNELS.get(kernel) if type(kernel) is str else None
    if kernel_id is None:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
    if type(head_dim_v) is not int:
        head_dim_v = _int_arg(head_dim_v, "head_dim_v")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v: must be 512, got {head_dim_v}")
    if softmax_scale is None:
        softmax_scale = DEFAULT_SOFTMAX_SCALE
    elif type(softmax_scale) is not float:
        softmax_scale = _scale_of(softmax_scale)
    if causal is not False and causal is not True:
        causal = _bool_of(causal, "causal")
    if type(tile_scheduler_metadata) is not _Tensor and isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        tile_scheduler_metadata, num_splits = _plan_sched(
            tile_scheduler_metadata, q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
            descale_q, descale_k)
    elif num_splits is None:
        raise ValueError("num_splits: None is only valid with a FlashMLASchedMeta from get_mla_metadata(); "
                         "pass the num_splits returned together with tile_scheduler_metadata")
    if check_inputs:
        _require_tensors(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                         tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits)
        _torch_ops.check_inputs_on_device(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                          tile_scheduler_metadata, num_splits, softmax_scale, descale_q, descale_k)
    if _torch_ops.eager_direct(q):
        # One call into the compiled module: every check, the allocations (torch), the launch.
        result = _torch_ops.decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                   num_splits, softmax_scale, causal, kernel_id, out, lse, descale_q, descale_k)
        if result is not None:
            return result
    # Traced (torch.compile, export, FakeTensorMode, ...) or arguments that are not plain tensors.
    _require_tensors(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                     tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits)
    _require_optional_tensors(descale_q=descale_q, descale_k=descale_k)
    if out is None and lse is None:
        return _torch_ops.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                     tile_scheduler_metadata, num_splits, softmax_scale, causal, kernel_id,
                                     descale_q, descale_k)
    out, lse = _outputs_for(q, out, lse)
    _torch_ops.mla_decode_out(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                              num_splits, out, lse, softmax_scale, causal, kernel_id, descale_q, descale_k)
    return out, lse


def _require_optional_tensors(**tensors) -> None:
    _require_tensors(**{name: t for name, t in tensors.items() if t is not None})


def _fp8_cache_view(k_cache):
    """k_cache of a call with is_fp8_kvcache=True: float8_e4m3fn as it is, or raw uint8 bytes
    (as engines allocate FP8 caches) viewed as float8_e4m3fn."""
    dtype = getattr(k_cache, "dtype", None)
    if dtype == torch.uint8:
        return k_cache.view(torch.float8_e4m3fn)
    if dtype != torch.float8_e4m3fn:
        raise TypeError(f"k_cache: is_fp8_kvcache=True needs a float8_e4m3fn (or uint8) cache, got {dtype}")
    return k_cache


def _outputs_for(q: torch.Tensor, out, lse):
    """out= / lse= as given, the missing one allocated (their checks are in the compiled module)."""
    if out is None or lse is None:
        if q.dim() != 4:
            raise ValueError(f"q: expected 4 dims (batch, s_q, h_q, 576), got shape {tuple(q.shape)}")
        batch, seqlen_q, heads_q, _ = q.shape
        if out is None:
            out = torch.empty((batch, seqlen_q, heads_q, HEAD_DIM_V), dtype=_torch_ops.out_dtype(q.dtype),
                              device=q.device)
        if lse is None:
            lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    _require_tensors(out=out, lse=lse)
    return out, lse


def _is_traced(t: torch.Tensor) -> bool:
    """Under torch.compile or FakeTensorMode: no data to hand to the compiled module."""
    from torch._subclasses.fake_tensor import is_fake
    return torch.compiler.is_compiling() or is_fake(t)


def _plan_sched(sched: FlashMLASchedMeta, q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                causal, descale_q=None, descale_k=None):
    if sched.config is None:
        _require_tensors(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens)
        if not _is_traced(q):
            # Every input check before the planning launch (the metadata's come with the decode).
            # (Under torch.compile the custom ops' fake implementations check shapes instead.)
            _C.torch_check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, None, None, softmax_scale,
                                  check_device=False, descale_q=descale_q, descale_k=descale_k)
            for name, t in (("q", q), ("k_cache", k_cache), ("block_table", block_table)):
                if t.device != cache_seqlens.device:
                    raise ValueError(f"{name}: must be on cache_seqlens' device ({cache_seqlens.device}), "
                                     f"got {t.device}")
        batch, seqlen_q, heads_q, _ = q.shape
        page, heads_kv = k_cache.shape[1], k_cache.shape[2]
        rows = seqlen_q * heads_q // heads_kv
        planned = None
        if _torch_ops.eager_direct(cache_seqlens):
            planned = _torch_ops.metadata(cache_seqlens, rows, heads_kv)
        if planned is None:
            planned = _torch_ops.get_mla_metadata(cache_seqlens, rows, heads_kv)
        sched.tile_scheduler_metadata, sched.num_splits = planned
        sched.config = (batch, seqlen_q, heads_q, page, heads_kv, bool(causal))
        return planned
    # Planned: the configuration must not have changed. (Arguments of the wrong kind or rank are
    # left to the decode's own checks, which name them.)
    q_shape, k_shape = getattr(q, "shape", ()), getattr(k_cache, "shape", ())
    if len(q_shape) == 4 and len(k_shape) == 4:
        config = (q_shape[0], q_shape[1], q_shape[2], k_shape[1], k_shape[2], bool(causal))
        if config != sched.config:
            names = ("batch", "s_q", "h_q", "page_block_size", "h_kv", "causal")
            diff = ", ".join(f"{n}: {a} -> {b}" for n, a, b in zip(names, sched.config, config) if a != b)
            raise ValueError(f"FlashMLASchedMeta was planned for another configuration ({diff}); "
                             "create a new one with get_mla_metadata()")
    return sched.tile_scheduler_metadata, sched.num_splits


def host_plan(cache_seqlens, num_heads_per_head_k: int, num_heads_k: int, num_sms: int):
    """The scheduler's plan computed on the CPU (the reference of the GPU metadata kernel).

    Returns ``(tile_scheduler_metadata, num_splits)`` as lists of ints (rows of 8, and b + 1).
    """
    seqlens = cache_seqlens.tolist() if hasattr(cache_seqlens, "tolist") else [int(x) for x in cache_seqlens]
    parts = _C.num_sm_parts(num_sms, num_heads_per_head_k, num_heads_k)
    return _C.host_plan(seqlens, parts)


def kernel_for_device(device=None, kernel: str = "auto") -> str:
    """Name of the decode kernel that runs on ``device`` (a CUDA device, its index, or None for
    the current one) for the given choice. RuntimeError without a usable CUDA device."""
    if type(kernel) is not str or kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
    if device is None:
        dev = torch.device("cuda")
    elif isinstance(device, (str, torch.device)):
        dev = torch.device(device)
    else:  # an index (torch.device(int) needs an accelerator to resolve it)
        dev = torch.device("cuda", _int_arg(device, "device"))
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    if not torch.cuda.is_available():
        raise RuntimeError("flash_mla: no CUDA device is available (torch.cuda.is_available() is False: no GPU, "
                           "no driver, or a CPU-only build of torch)")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return _C.kernel_name(index, _KERNELS[kernel])


# ----------------------------------------------------------------------------------------------
# token-sparse decode
# ----------------------------------------------------------------------------------------------

_BYTE_DTYPES = (torch.uint8, torch.int8)
_SPARSE_CONFIG_NAMES = ("batch", "s_q", "h_q", "is_fp8_kvcache", "record", "keys per query token")


def _byte_cache_view(cache):
    """An FP8 token-sparse cache as float8_e4m3fn (uint8 / int8 bytes are viewed so)."""
    if cache is not None and getattr(cache, "dtype", None) in _BYTE_DTYPES:
        return cache.view(torch.float8_e4m3fn)
    return cache


def _plan_sparse(sched, q, k_cache, indices, extra_indices, is_fp8: bool, traced: bool):
    """(plan_seqlens, tile_scheduler_metadata, num_splits) of a token-sparse call: the plan of
    batch * s_q requests of one query token and topk + extra_topk keys each; planned once per
    FlashMLASchedMeta (or per call without one)."""
    batch, seqlen_q, heads_q = q.shape[0], q.shape[1], q.shape[2]
    keys = indices.shape[2] + (extra_indices.shape[2] if extra_indices is not None else 0)
    config = ("token-sparse", batch, seqlen_q, heads_q, bool(is_fp8), k_cache.shape[-1], keys)
    if isinstance(sched, FlashMLASchedMeta) and sched.config is not None:
        if config != sched.config:
            old = sched.config if sched.config[0] == "token-sparse" else None
            if old is None:
                raise ValueError("FlashMLASchedMeta was planned for a dense call; create a new one with "
                                 "get_mla_metadata() for token-sparse calls")
            diff = ", ".join(f"{n}: {a} -> {b}" for n, a, b in zip(_SPARSE_CONFIG_NAMES, old[1:], config[1:]) if a != b)
            raise ValueError(f"FlashMLASchedMeta was planned for another configuration ({diff}); "
                             "create a new one with get_mla_metadata()")
        return sched.plan_seqlens, sched.tile_scheduler_metadata, sched.num_splits
    plan_seqlens = torch.full((batch * seqlen_q,), keys, dtype=torch.int32, device=q.device)
    planned = None
    if not traced:
        planned = _torch_ops.metadata(plan_seqlens, heads_q, 1)
    if planned is None:
        planned = _torch_ops.get_mla_metadata(plan_seqlens, heads_q, 1)
    if isinstance(sched, FlashMLASchedMeta):
        sched.plan_seqlens = plan_seqlens
        sched.tile_scheduler_metadata, sched.num_splits = planned
        sched.config = config
    return (plan_seqlens, *planned)


def _sparse_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, sched, num_splits, softmax_scale, causal,
                   is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices, topk_length, extra_topk_length,
                   descale_q, descale_k, kernel, out, lse):
    """The token-sparse form of flash_mla_with_kvcache (docs/api.md, "Token-sparse decode")."""
    for name, value in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if value is not None:
            raise ValueError(f"{name}: must be None with indices (token-sparse decode)")
    for name, value in (("descale_q", descale_q), ("descale_k", descale_k)):
        if value is not None:
            raise ValueError(f"{name}: not used by token-sparse decode (its FP8 formats carry their own scales)")
    if num_splits is not None and not isinstance(num_splits, torch.Tensor):
        raise TypeError(f"num_splits: expected None, got {type(num_splits).__name__}")
    if causal is not False and _bool_of(causal, "causal"):
        raise ValueError("causal: must be False with indices (the indices select the keys)")
    kernel_id = _KERNELS.get(kernel) if type(kernel) is str else None
    if kernel_id is None:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
    head_dim_v = _int_arg(head_dim_v, "head_dim_v")
    is_fp8 = _bool_of(is_fp8_kvcache, "is_fp8_kvcache")
    if is_fp8:
        k_cache = _byte_cache_view(k_cache)
        extra_k_cache = _byte_cache_view(extra_k_cache)
    _require_tensors(q=q, k_cache=k_cache, indices=indices)
    check_sparse_kernel(kernel_id, is_fp8, k_cache.shape)
    _require_optional_tensors(topk_length=topk_length, extra_k_cache=extra_k_cache,
                              extra_indices_in_kvcache=extra_indices, extra_topk_length=extra_topk_length,
                              attn_sink=attn_sink, out=out, lse=lse)
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims (batch, s_q, h_q, d_qk), got shape {tuple(q.shape)}")
    if indices.dim() != 3:
        raise ValueError(f"indices: expected 3 dims (batch, s_q, topk), got shape {tuple(indices.shape)}")
    if extra_indices is not None and extra_indices.dim() != 3:
        raise ValueError(f"extra_indices_in_kvcache: expected 3 dims (batch, s_q, topk), got shape "
                         f"{tuple(extra_indices.shape)}")
    softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else _scale_of(softmax_scale)
    if q.shape[0] > 1 and q.shape[1] > 1 and q.stride(0) != q.shape[1] * q.stride(1):
        q = q.contiguous()  # the kernel walks (request, query token) as one index
    traced = not _torch_ops.eager_direct(q) or _is_traced(q)
    user_lse = None
    if (not traced and isinstance(lse, torch.Tensor) and lse.dim() == 3
            and not lse.transpose(1, 2).is_contiguous()):
        user_lse, lse = lse, None  # the kernel writes (batch, s_q, h_q) memory: copied after the call
    if not traced and not (isinstance(sched, FlashMLASchedMeta) and sched.config is not None):
        # Every input check before the planning launch (the call itself checks them again).
        _torch_ops.check_sparse(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                                attn_sink, head_dim_v, softmax_scale, is_fp8, out,
                                user_lse if user_lse is not None else lse)
    plan = _plan_sparse(sched if isinstance(sched, FlashMLASchedMeta) else None, q, k_cache, indices, extra_indices,
                        is_fp8, traced)
    if not traced:
        result, result_lse = _torch_ops.sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices,
                                                      extra_topk_length, attn_sink, head_dim_v, softmax_scale, is_fp8,
                                                      *plan, kernel_id, out, lse)
        if user_lse is not None:
            user_lse.copy_(result_lse)
            result_lse = user_lse
        return result, result_lse
    result, lse_bsh = _torch_ops.sparse_decode_op(q, k_cache, indices, topk_length, extra_k_cache, extra_indices,
                                                  extra_topk_length, attn_sink, head_dim_v, softmax_scale, is_fp8,
                                                  *plan, kernel_id)
    result_lse = lse_bsh.transpose(1, 2)
    if out is not None:
        out.copy_(result)
        result = out
    if lse is not None:
        lse.copy_(result_lse)
        result_lse = lse
    return result, result_lse

