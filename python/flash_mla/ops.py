"""Framework-neutral entry points: DLPack arrays in, caller-provided outputs, explicit stream.

Nothing here imports torch (nor any other array library): every array argument may be a
torch tensor, a CuPy array, a JAX array (inputs only, see below), a NumPy array (which fails
the CUDA-device check), or anything else exporting ``__dlpack__``. The caller allocates the
outputs and the split-KV workspace (``workspace_shapes`` gives their shapes) and names the CUDA
stream the kernels run on. One decoding step::

    from flash_mla import ops
    parts = ops.num_sm_parts(s_q, h_q, h_kv)                 # needs the GPU's SM count
    shapes = ops.workspace_shapes(batch, s_q, h_q, h_kv, parts)
    meta = cp.empty(shapes["tile_scheduler_metadata"], cp.int32)
    splits = cp.empty(shapes["num_splits"], cp.int32)
    ops.get_mla_metadata(cache_seqlens, meta, splits, stream=s)          # once per step
    for layer in layers:                                                 # reuse meta/splits
        ops.mla_decode(q, k_cache, block_table, cache_seqlens, meta, splits,
                       out, lse, o_accum, lse_accum, causal=True, stream=s)

Dtypes: ``q``/``k_cache``/``out`` bfloat16 or float16 (CuPy has no bfloat16: use float16
there), ``lse``/``o_accum``/``lse_accum`` float32, every index array int32 (see ``DTYPES``).
Everything is checked (shapes, dtypes, strides, devices, writability) before any launch;
errors are TypeError / ValueError naming the argument, RuntimeError from the launch.

Streams: ``stream`` is an int handle (``0``: the legacy default stream), an object with
``__cuda_stream__`` (the CUDA stream protocol), ``.ptr`` (CuPy), ``.cuda_stream`` (torch), or
None (= 0). The arrays are imported through ``__dlpack__()`` without a stream argument, so
the producer's own rules apply: torch does not synchronise, CuPy makes the legacy default
stream wait for its current stream, JAX blocks until the array is ready. Launch on the stream
that produced the inputs (or synchronise) and read the outputs after the kernels finish, e.g.
``jax.dlpack.from_dlpack(out)`` after the stream's work is done or from the same stream.

JAX arrays are immutable: pass them as inputs only. Outputs and workspace must be writable
buffers of another framework (CuPy, torch); import ``out``/``lse`` into JAX afterwards with
``jax.dlpack.from_dlpack`` (zero-copy). Passing a JAX array as an output raises TypeError.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

from . import _C

HEAD_DIM = 576
HEAD_DIM_V = 512
PAGE_BLOCK_SIZE = 64  # FlashMLA's page size; k_cache may use any of PAGE_BLOCK_SIZES
PAGE_BLOCK_SIZES = (16, 32, 64, 128, 256)
META_INTS = 8
INPUT_CHECK_WORDS = _C.INPUT_CHECK_WORDS
DEFAULT_SOFTMAX_SCALE = 1.0 / math.sqrt(HEAD_DIM)

#: Kernel names accepted by ``kernel=`` (ints are passed through to the compiled module).
KERNELS = {"auto": 0, "sm80_large": 1, "sm80_small": 2, "sm90": 3}

#: dtype of every array of a decode call ("q" = the dtype of q: bfloat16 or float16).
DTYPES = {
    "q": "bfloat16 or float16",
    "k_cache": "q",
    "block_table": "int32",
    "cache_seqlens": "int32",
    "tile_scheduler_metadata": "int32",
    "num_splits": "int32",
    "out": "q",
    "lse": "float32",
    "o_accum": "float32",
    "lse_accum": "float32",
}

__all__ = [
    "DTYPES", "KERNELS", "INPUT_CHECK_WORDS", "check_paged_inputs", "device_sm_count",
    "get_mla_metadata", "input_check_error", "mla_decode", "num_sm_parts", "sparse_decode",
    "sparse_workspace_shapes", "stream_handle", "workspace_shapes",
]


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _int(value: Any, name: str) -> int:
    """A Python int (bool and float rejected: they are almost always a mistake here)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value.__index__()


def stream_handle(stream: Any) -> int:
    """The ``cudaStream_t`` of ``stream`` as an int.

    Accepts None (0, the legacy default stream), a non-negative int, an object implementing
    the CUDA stream protocol (``__cuda_stream__`` returning ``(version, handle)``), a CuPy
    stream (``.ptr``) or a torch stream (``.cuda_stream``).
    """
    if stream is None:
        return 0
    if isinstance(stream, bool):
        raise TypeError("stream: expected an int handle or a stream object, got bool")
    if isinstance(stream, int) or hasattr(type(stream), "__index__"):  # int, numpy integers
        handle = stream
    elif hasattr(stream, "__cuda_stream__"):
        proto = stream.__cuda_stream__
        proto = proto() if callable(proto) else proto
        if isinstance(proto, tuple) and len(proto) == 2:
            handle = proto[1]
        else:
            raise TypeError(f"stream: __cuda_stream__ must give (version, handle), got {proto!r}")
    elif hasattr(stream, "ptr"):
        handle = stream.ptr
    elif hasattr(stream, "cuda_stream"):
        handle = stream.cuda_stream
    else:
        raise TypeError(f"stream: expected an int handle or an object with __cuda_stream__, .ptr or "
                        f".cuda_stream, got {type(stream).__name__}")
    handle = _int(handle, "stream")
    if handle < 0 or handle >= 2 ** 64:
        raise ValueError(f"stream: handle must be in [0, 2^64), got {handle}")
    return handle


def _kernel_id(kernel: Any) -> int:
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: must be one of {sorted(KERNELS)}, got {kernel!r}")
        return KERNELS[kernel]
    kid = _int(kernel, "kernel")
    if not 0 <= kid < 2 ** 31:
        raise ValueError(f"kernel: unknown kernel id {kid}")
    return kid


def _softmax_scale(value: Any) -> float:
    if value is None:
        return DEFAULT_SOFTMAX_SCALE
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"softmax_scale: expected a float, got {type(value).__name__}")
    try:
        scale = float(value)
    except OverflowError:
        raise ValueError(f"softmax_scale: must be finite and > 0, got {value!r}") from None
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"softmax_scale: must be finite and > 0, got {scale}")
    return scale


def _reject_immutable(**arrays: Any) -> None:
    """JAX arrays must never be written: reject them as outputs with a useful message."""
    for name, array in arrays.items():
        module = type(array).__module__ or ""
        if module == "jax" or module.startswith(("jax.", "jaxlib")):
            raise TypeError(f"{name}: JAX arrays are immutable and cannot be outputs; pass a writable "
                            "CuPy or torch buffer and import it into JAX with jax.dlpack.from_dlpack")


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------


def device_sm_count(device: Optional[int] = None) -> int:
    """Number of SMs of CUDA device ``device`` (default: the current device)."""
    return _C.device_sm_count(-1 if device is None else _int(device, "device"))


def _heads(s_q: Any, h_q: Any, h_kv: Any) -> Tuple[int, int, int]:
    s_q, h_q, h_kv = _int(s_q, "s_q"), _int(h_q, "h_q"), _int(h_kv, "h_kv")
    for name, v in (("s_q", s_q), ("h_q", h_q), ("h_kv", h_kv)):
        if not 1 <= v <= 2 ** 30:
            raise ValueError(f"{name}: must be in [1, 2^30], got {v}")
    if h_q % h_kv:
        raise ValueError(f"h_q % h_kv must be 0, got h_q = {h_q}, h_kv = {h_kv}")
    if s_q * h_q > 2 ** 30:
        raise ValueError(f"s_q * h_q must be <= 2^30, got {s_q * h_q}")
    return s_q, h_q, h_kv


def num_sm_parts(s_q: int, h_q: int, h_kv: int, *, num_sms: Optional[int] = None,
                 device: Optional[int] = None) -> int:
    """Rows of ``tile_scheduler_metadata`` for a decode with these head counts.

    ``num_sms`` defaults to the SM count of ``device`` (default: the current CUDA device); the
    same number must be used for the metadata of every call that shares it.
    """
    s_q, h_q, h_kv = _heads(s_q, h_q, h_kv)
    sms = device_sm_count(device) if num_sms is None else _int(num_sms, "num_sms")
    return _C.num_sm_parts(sms, s_q * h_q // h_kv, h_kv)


def workspace_shapes(batch: int, s_q: int, h_q: int, h_kv: int, num_sm_parts: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the arrays a caller allocates for one decode configuration.

    Returns a dict with the keys ``tile_scheduler_metadata``, ``num_splits`` (outputs of
    ``get_mla_metadata``), ``out``, ``lse`` (outputs of ``mla_decode``) and ``o_accum``,
    ``lse_accum`` (its split workspace, any content). ``DTYPES`` gives their dtypes. Every
    array must be contiguous; ``out`` and ``o_accum`` 16-byte aligned (fresh allocations are).
    """
    batch = _int(batch, "batch")
    s_q, h_q, h_kv = _heads(s_q, h_q, h_kv)
    parts = _int(num_sm_parts, "num_sm_parts")
    splits = _C.workspace_splits(batch, parts)
    rows = s_q * h_q
    return {
        "tile_scheduler_metadata": (parts, META_INTS),
        "num_splits": (batch + 1,),
        "out": (batch, s_q, h_q, HEAD_DIM_V),
        "lse": (batch, h_q, s_q),
        "o_accum": (splits, rows, HEAD_DIM_V),
        "lse_accum": (splits, rows),
    }


# ----------------------------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------------------------


def get_mla_metadata(cache_seqlens: Any, tile_scheduler_metadata: Any, num_splits: Any,
                     stream: Any = None) -> Tuple[Any, Any]:
    """Plans the split-KV schedule on the GPU into the given int32 arrays (no host sync).

    ``tile_scheduler_metadata``: ``(num_sm_parts, 8)``; ``num_splits``: ``(batch + 1,)``
    (see ``workspace_shapes``). Returns them. Reuse them for every layer of the step.
    """
    _reject_immutable(tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits)
    _C.get_mla_metadata(cache_seqlens, tile_scheduler_metadata, num_splits, stream_handle(stream))
    return tile_scheduler_metadata, num_splits


def mla_decode(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any, tile_scheduler_metadata: Any,
               num_splits: Any, out: Any, lse: Any, o_accum: Any, lse_accum: Any,
               softmax_scale: Optional[float] = None, causal: bool = False, stream: Any = None,
               *, kernel: Any = "auto", descale_q: Any = None, descale_k: Any = None) -> Tuple[Any, Any]:
    """MLA decode into caller-provided ``out`` / ``lse`` (same contract as
    ``flash_mla_with_kvcache``). Returns ``(out, lse)``. Asynchronous on ``stream``.

    An FP8 cache (or q) comes as a float8_e4m3fn DLPack array with ``descale_k`` (``descale_q``):
    float32 arrays of shape ``(1,)`` on the same device, read by the kernel."""
    _reject_immutable(out=out, lse=lse, o_accum=o_accum, lse_accum=lse_accum)
    if isinstance(causal, (str, bytes)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    _C.mla_decode(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_scheduler_metadata, num_splits,
                  out, lse, o_accum, lse_accum, _softmax_scale(softmax_scale), bool(causal), _kernel_id(kernel),
                  stream_handle(stream), descale_q, descale_k)
    return out, lse


def sparse_workspace_shapes(batch: int, s_q: int, h_q: int, num_sm_parts: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the arrays a caller allocates for a token-sparse decode configuration.

    Returns a dict with the keys ``plan_seqlens`` (int32, filled by the caller: the keys of each
    query token, normally ``topk + extra_topk`` for all ``batch * s_q`` of them),
    ``tile_scheduler_metadata``, ``num_splits`` (``get_mla_metadata(plan_seqlens, ...)``), ``out``
    (bfloat16), ``lse`` (float32, **(batch, s_q, h_q)**) and ``o_accum``, ``lse_accum`` (float32
    workspace). ``num_sm_parts`` is ``num_sm_parts(1, h_q, 1)``: each query token is planned as a
    request of its own.
    """
    batch = _int(batch, "batch")
    s_q, h_q, _ = _heads(s_q, h_q, 1)
    parts = _int(num_sm_parts, "num_sm_parts")
    pairs = batch * s_q
    splits = _C.workspace_splits(pairs, parts)
    return {
        "plan_seqlens": (pairs,),
        "tile_scheduler_metadata": (parts, META_INTS),
        "num_splits": (pairs + 1,),
        "out": (batch, s_q, h_q, HEAD_DIM_V),
        "lse": (batch, s_q, h_q),
        "o_accum": (splits, h_q, HEAD_DIM_V),
        "lse_accum": (splits, h_q),
    }


_V32_TOKEN_BYTES = 656  # the V3.2 FP8 format's bytes per token (kv_formats.V32_BYTES_PER_TOKEN)


def check_sparse_kernel(kernel_id: int, is_fp8_kvcache: bool, k_cache_shape: Any) -> None:
    """kernel="sm90" with indices: the Hopper token-sparse kernel takes the V3.2 FP8 format (a cache
    of 656-byte tokens) and bf16 caches of 576 channels; every other format runs on the portable
    kernels."""
    if kernel_id != KERNELS["sm90"]:
        return
    last = k_cache_shape[-1] if k_cache_shape is not None and len(k_cache_shape) > 0 else None
    if not ((is_fp8_kvcache and last == _V32_TOKEN_BYTES) or (not is_fp8_kvcache and last == HEAD_DIM)):
        raise ValueError("kernel: the sm90 token-sparse kernel takes the V3.2 FP8 format (656-byte tokens) and bf16 "
                         "caches of 576 channels; this format runs on the portable kernels ('auto', 'sm80_large', "
                         "'sm80_small')")


def sparse_decode(q: Any, k_cache: Any, indices: Any, plan_seqlens: Any, tile_scheduler_metadata: Any,
                  num_splits: Any, out: Any, lse: Any, o_accum: Any, lse_accum: Any, *, is_fp8_kvcache: bool,
                  topk_length: Any = None, extra_k_cache: Any = None, extra_indices_in_kvcache: Any = None,
                  extra_topk_length: Any = None, attn_sink: Any = None, softmax_scale: Optional[float] = None,
                  stream: Any = None, kernel: Any = "auto") -> Tuple[Any, Any]:
    """Token-sparse decode (the ``indices`` form of ``flash_mla_with_kvcache``, same contract and
    formats; FP8 caches may be uint8 / int8 / float8_e4m3fn arrays) into caller-provided arrays
    (``sparse_workspace_shapes``). ``q`` is bfloat16 ``(batch, s_q, h_q, d_qk)``; ``lse`` is
    ``(batch, s_q, h_q)`` here. ``softmax_scale`` defaults to ``1 / sqrt(d_qk)``. Returns
    ``(out, lse)``. Asynchronous on ``stream``."""
    _reject_immutable(out=out, lse=lse, o_accum=o_accum, lse_accum=lse_accum)
    if isinstance(is_fp8_kvcache, (str, bytes)):
        raise TypeError(f"is_fp8_kvcache: expected a bool, got {type(is_fp8_kvcache).__name__}")
    check_sparse_kernel(_kernel_id(kernel), bool(is_fp8_kvcache), getattr(k_cache, "shape", None))
    if softmax_scale is None:
        shape = getattr(q, "shape", None)
        softmax_scale = 1.0 / math.sqrt(shape[-1]) if shape is not None and len(shape) == 4 and shape[-1] > 0 \
            else DEFAULT_SOFTMAX_SCALE
    _C.sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache, extra_topk_length,
                     attn_sink, plan_seqlens, tile_scheduler_metadata, num_splits, out, lse, o_accum, lse_accum,
                     _softmax_scale(softmax_scale), bool(is_fp8_kvcache), _kernel_id(kernel), stream_handle(stream))
    return out, lse


def check_paged_inputs(block_table: Any, cache_seqlens: Any, num_blocks: int, result: Any,
                       stream: Any = None, *, page_size: int = PAGE_BLOCK_SIZE) -> Any:
    """Launches the GPU check of the indices a decode would use (asynchronous, no host sync).

    Checks that ``cache_seqlens[i]`` is in ``[0, page_size * max_blocks_per_seq]`` and that the
    first ``ceil(L_i / page_size)`` entries of row ``i`` of ``block_table`` are in
    ``[0, num_blocks)``. ``page_size``: tokens per page of the cache (dim 1 of ``k_cache``), one
    of ``PAGE_BLOCK_SIZES``.
    ``result``: a writable int64 array of ``INPUT_CHECK_WORDS`` (8) elements on the same
    device; read it back after the stream's work is done and give the values to
    ``input_check_error``. Returns ``result``.
    """
    _reject_immutable(result=result)
    _C.check_paged_inputs(block_table, cache_seqlens, _int(num_blocks, "num_blocks"), result,
                          stream_handle(stream), _int(page_size, "page_size"))
    return result


def input_check_error(values: Sequence[int], num_blocks: Optional[int] = None,
                      max_blocks_per_seq: Optional[int] = None, *, page_size: int = PAGE_BLOCK_SIZE) -> Optional[str]:
    """The message for the verdict of ``check_paged_inputs`` (its ``result`` read back as
    ints), or None when every checked entry is valid."""
    values = [int(v) for v in values]
    if len(values) < 5:
        raise ValueError(f"values: expected the {INPUT_CHECK_WORDS} words of the result, got {len(values)}")
    code, req, col, value, count = values[:5]
    if code == 0:
        return None
    more = f" ({count} invalid entries in all)" if count > 1 else ""
    if code == 1:
        limit = f"{page_size} * max_blocks_per_seq = {page_size * max_blocks_per_seq}" \
            if max_blocks_per_seq is not None else f"{page_size} * max_blocks_per_seq"
        return (f"cache_seqlens[{req}] = {value} is outside [0, {limit}]: the request needs more pages "
                f"than block_table has columns{more}")
    if code == 2:
        bound = f"[0, num_blocks = {num_blocks})" if num_blocks is not None else "[0, num_blocks)"
        return (f"block_table[{req}, {col}] = {value} is not a page of k_cache: used entries must be in "
                f"{bound}{more}")
    return f"input check: unknown verdict {values}"
