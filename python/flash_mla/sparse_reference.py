"""Plain-torch reference of token-sparse MLA decoding (DeepSeek-V3.2 and the 512-dim format).

``sparse_decode_reference`` computes what the token-sparse form of ``flash_mla_with_kvcache``
(``indices`` given) must return, over a cache that has already been dequantized to floats
(``flash_mla.kv_formats.dequantize_sparse_kv_cache`` reads both FP8 formats). It works one
(request, query token) at a time and is written to be obviously right rather than fast:

* Token ``idx`` of a cache is slot ``idx % page`` of page ``idx // page``. An index that is
  negative or ``>= num_blocks * page`` is invalid: it is skipped, and the cache is never read
  there (only valid rows are gathered, so NaN anywhere else cannot reach the result).
* ``topk_length[i]`` keeps only the first ``topk_length[i]`` entries of each of request
  ``i``'s index rows (clamped to ``0 .. topk``; 0 leaves no key from that cache).
* A duplicated index is a key as many times as it appears.
* The second cache (``extra_kv`` with ``extra_indices`` / ``extra_topk_length``, its own page
  size) adds its selected tokens to the same softmax.
* Scores ``softmax_scale * <q, K>`` over all ``d_qk`` channels (``softmax_scale`` defaults to
  ``1 / sqrt(d_qk)``); ``lse`` is their natural-log log-sum-exp; ``out = sum softmax * V`` with
  V the first ``head_dim_v`` channels of each key.
* ``attn_sink[h]``: ``out *= 1 / (1 + exp(attn_sink[h] - lse))`` (computed as
  ``sigmoid(lse - attn_sink[h])``: ``+inf`` gives 0, ``-inf`` gives 1); ``lse`` is returned
  without the sink.
* A (request, token) with no valid key gets ``out = 0`` and ``lse = +inf`` (sink or not).

This module imports nothing from the compiled extension.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

__all__ = ["sparse_decode_reference"]


def _check(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(msg)


def _check_cache(kv: torch.Tensor, name: str, d: int) -> None:
    _check(isinstance(kv, torch.Tensor), f"{name} must be a torch.Tensor", TypeError)
    _check(kv.is_floating_point() and kv.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2),
           f"{name} must be a dequantized float cache (got {kv.dtype}); read FP8 caches with "
           "flash_mla.kv_formats.dequantize_sparse_kv_cache first", TypeError)
    _check(kv.dim() == 4 and kv.shape[2] == 1 and kv.shape[3] == d,
           f"{name} must be (num_blocks, page, 1, {d}), got {tuple(kv.shape)}")
    _check(kv.shape[1] >= 1, f"{name} page size must be >= 1")


def _check_indices(idx: torch.Tensor, name: str, b: int, s_q: int) -> None:
    _check(isinstance(idx, torch.Tensor) and not idx.is_floating_point()
           and idx.dtype != torch.bool, f"{name} must be an integer tensor", TypeError)
    _check(idx.dim() == 3 and idx.shape[0] == b and idx.shape[1] == s_q,
           f"{name} must be (b={b}, s_q={s_q}, topk), got {tuple(idx.shape)}")


def _lengths(topk_length: Optional[torch.Tensor], name: str, b: int, topk: int) -> List[int]:
    if topk_length is None:
        return [topk] * b
    _check(isinstance(topk_length, torch.Tensor) and not topk_length.is_floating_point(),
           f"{name} must be an integer tensor", TypeError)
    _check(topk_length.dim() == 1 and topk_length.shape[0] == b,
           f"{name} must be (b={b},), got {tuple(topk_length.shape)}")
    return [min(max(int(n), 0), topk) for n in topk_length.tolist()]


@torch.no_grad()
def sparse_decode_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    *,
    topk_length: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_kv: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    head_dim_v: int = 512,
    accum_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference token-sparse MLA decode.

    Args:
        q: (b, s_q, h_q, d_qk) query, any float dtype, any strides, any ``h_q >= 1``.
        kv: (num_blocks, page, 1, d_qk) float cache (dequantized), any strides.
        indices: (b, s_q, topk) integer token indices into ``kv`` (see the module docstring for
            which are valid).
        topk_length: optional (b,) integer; only the first ``topk_length[i]`` entries of
            request ``i``'s rows are used.
        attn_sink: optional (h_q,) float; scales ``out`` by ``1 / (1 + exp(sink - lse))``.
        extra_kv, extra_indices, extra_topk_length: an optional second cache (its own
            ``num_blocks`` and page size, same ``d_qk``) with its own (b, s_q, extra_topk)
            indices and optional (b,) lengths; its tokens join the same softmax.
        softmax_scale: multiplier of ``q . k``; defaults to ``1 / sqrt(d_qk)``.
        head_dim_v: V is the first ``head_dim_v`` channels of each key (512 for both formats).
        accum_dtype: dtype of every intermediate (float32 by default; float64 for a reference
            whose own rounding error is negligible).

    Returns:
        ``(out, lse)``: ``out`` float32 (b, s_q, h_q, head_dim_v), ``lse`` float32
        (b, h_q, s_q) (natural log, without the sink), both on q's device. Rows with no valid
        key: ``out == 0``, ``lse == +inf``.
    """
    _check(isinstance(q, torch.Tensor) and q.is_floating_point(), "q must be a float tensor", TypeError)
    _check(q.dim() == 4, f"q must be 4-D (b, s_q, h_q, d_qk), got shape {tuple(q.shape)}")
    b, s_q, h_q, d = q.shape
    _check(h_q >= 1 and s_q >= 1, "h_q and s_q must be >= 1")
    _check(0 < head_dim_v <= d, f"head_dim_v must be in 1..{d}, got {head_dim_v}")
    _check_cache(kv, "kv", d)
    _check_indices(indices, "indices", b, s_q)
    caches = [(kv, indices, _lengths(topk_length, "topk_length", b, indices.shape[2]))]
    if extra_kv is not None or extra_indices is not None:
        _check(extra_kv is not None and extra_indices is not None,
               "extra_kv and extra_indices must be given together")
        _check_cache(extra_kv, "extra_kv", d)
        _check_indices(extra_indices, "extra_indices", b, s_q)
        caches.append((extra_kv, extra_indices,
                       _lengths(extra_topk_length, "extra_topk_length", b, extra_indices.shape[2])))
    else:
        _check(extra_topk_length is None, "extra_topk_length given without extra_kv")
    if attn_sink is not None:
        _check(isinstance(attn_sink, torch.Tensor) and attn_sink.is_floating_point()
               and attn_sink.dim() == 1 and attn_sink.shape[0] == h_q,
               f"attn_sink must be a float (h_q={h_q},) tensor")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    _check(math.isfinite(softmax_scale), "softmax_scale must be finite")

    device = q.device
    out = torch.zeros((b, s_q, h_q, head_dim_v), dtype=torch.float32, device=device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=device)
    sink = attn_sink.to(device=device, dtype=accum_dtype) if attn_sink is not None else None

    # (num_blocks, page, 1, d) -> (num_blocks * page, d): row idx is slot idx % page of page
    # idx // page. reshape copies only when the strides demand it (never reads past the tensor).
    flat = [(c.reshape(c.shape[0] * c.shape[1], d), idx, lens) for c, idx, lens in caches]

    for i in range(b):
        for t in range(s_q):
            keys = []
            for cache, idx, lens in flat:
                row = idx[i, t, : lens[i]].to(device=cache.device, dtype=torch.int64)
                row = row[(row >= 0) & (row < cache.shape[0])]  # only valid tokens are read
                keys.append(cache.index_select(0, row).to(device=device, dtype=accum_dtype))
            k = torch.cat(keys, dim=0)  # (n, d), duplicates kept
            if k.shape[0] == 0:
                continue  # out stays 0, lse stays +inf
            qi = q[i, t].to(accum_dtype)  # (h_q, d)
            scores = torch.matmul(qi, k.t()) * softmax_scale  # (h_q, n)
            row_lse = torch.logsumexp(scores, dim=-1)  # (h_q,)
            probs = torch.exp(scores - row_lse.unsqueeze(-1))
            o = torch.matmul(probs, k[:, :head_dim_v])  # (h_q, dv)
            if sink is not None:
                o = o * torch.sigmoid(row_lse - sink).unsqueeze(-1)
            out[i, t] = o.to(torch.float32)
            lse[i, :, t] = row_lse.to(torch.float32)
    return out, lse
