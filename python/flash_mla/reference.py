"""Plain-torch reference of the MLA decoding contract (docs/api.md).

``mla_decode_reference`` computes exactly what ``flash_mla_with_kvcache`` must return, with
ordinary torch operations, one request at a time, on the device the inputs live on. It is the
oracle of the GPU tests, so it is written to be obviously right rather than fast:

* Only what the contract allows the kernel to read is read: pages ``0 .. ceil(L/64) - 1`` of
  each ``block_table`` row and tokens ``0 .. L - 1`` of the gathered pages. Junk in the unused
  tail of ``block_table`` and NaN in unused cache slots therefore never reach the result
  (NaN * 0 would otherwise poison it).
* Query head ``h`` attends with KV head ``h // (h_q // h_kv)``.
* Causal masking (only meaningful when ``s_q > 1``): query token ``t`` sees keys
  ``0 .. L - s_q + t``.
* A (request, token, head) row that sees no key (``L == 0``, or causal with
  ``L - s_q + t < 0``) gets ``out = 0`` and ``lse = +inf``.
* ``lse`` is the natural-log log-sum-exp of the scaled scores.

This module deliberately imports nothing from the compiled extension (``flash_mla._C``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["mla_decode_reference"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@torch.no_grad()
def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    *,
    accum_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference MLA decode over a paged KV cache.

    Args:
        q: (b, s_q, h_q, d) query, any float dtype, any strides.
        k_cache: (num_blocks, page_block_size, h_kv, d) paged cache; V is ``k[..., :head_dim_v]``.
        block_table: (b, max_blocks_per_seq) integer tensor; entry ``[i, p]`` is the physical
            page of logical page ``p`` of request ``i``. Entries past ``ceil(L_i / page)`` are
            never read.
        cache_seqlens: (b,) integer tensor of KV lengths (>= 0).
        head_dim_v: number of leading channels of each cache row that form V (512 for MLA).
        softmax_scale: multiplier of ``q . k``; defaults to ``1 / sqrt(d)`` (``1/sqrt(576)``
            for MLA).
        causal: mask query token ``t`` to keys ``0 .. L - s_q + t`` (no effect when s_q == 1).
        accum_dtype: dtype of every intermediate (torch.float32 by default, torch.float64 for
            a reference whose own rounding error is negligible). Note that float32 matmuls on
            CUDA follow torch's TF32 settings; float64 does not depend on them.

    Returns:
        ``(out, lse)``: ``out`` float32 (b, s_q, h_q, head_dim_v), ``lse`` float32
        (b, h_q, s_q), both on q's device. Rows with no visible key have ``out == 0`` and
        ``lse == +inf``.
    """
    _check(q.dim() == 4, f"q must be 4-D (b, s_q, h_q, d), got shape {tuple(q.shape)}")
    _check(k_cache.dim() == 4,
           f"k_cache must be 4-D (num_blocks, page_block_size, h_kv, d), got {tuple(k_cache.shape)}")
    b, s_q, h_q, d = q.shape
    num_blocks, page_size, h_kv, d_k = k_cache.shape
    _check(d_k == d, f"k_cache head dim {d_k} != q head dim {d}")
    _check(0 < head_dim_v <= d, f"head_dim_v must be in 1..{d}, got {head_dim_v}")
    _check(page_size > 0, "k_cache page_block_size must be positive")
    _check(h_kv > 0 and h_q % h_kv == 0, f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    _check(block_table.dim() == 2 and block_table.shape[0] == b,
           f"block_table must be (b={b}, max_blocks_per_seq), got {tuple(block_table.shape)}")
    _check(cache_seqlens.dim() == 1 and cache_seqlens.shape[0] == b,
           f"cache_seqlens must be (b={b},), got {tuple(cache_seqlens.shape)}")
    _check(not block_table.is_floating_point() and not cache_seqlens.is_floating_point(),
           "block_table and cache_seqlens must be integer tensors")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    _check(math.isfinite(softmax_scale), "softmax_scale must be finite")

    device = q.device
    group = h_q // h_kv  # query heads per KV head
    out = torch.zeros((b, s_q, h_q, head_dim_v), dtype=torch.float32, device=device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=device)

    seqlens = [int(x) for x in cache_seqlens.tolist()]
    max_pages = block_table.shape[1]
    for i, seqlen in enumerate(seqlens):
        _check(seqlen >= 0, f"cache_seqlens[{i}] = {seqlen} is negative")
        if seqlen == 0:
            continue  # no key at all: out stays 0, lse stays +inf
        num_pages = -(-seqlen // page_size)
        _check(num_pages <= max_pages,
               f"request {i}: {seqlen} tokens need {num_pages} pages, block_table has {max_pages}")
        pages = block_table[i, :num_pages].to(device=k_cache.device, dtype=torch.long)
        bad = (pages < 0) | (pages >= num_blocks)
        _check(not bool(bad.any()),
               f"request {i}: block_table holds a page outside 0..{num_blocks - 1} among its "
               f"first {num_pages} entries")

        # (num_pages, page, h_kv, d) -> (L, h_kv, d): only the first L tokens, never the tail.
        keys = k_cache[pages].reshape(num_pages * page_size, h_kv, d)[:seqlen]
        keys = keys.to(device=device, dtype=accum_dtype).permute(1, 0, 2)  # (h_kv, L, d)
        values = keys[:, :, :head_dim_v]  # (h_kv, L, dv): V is the same memory as K

        # q[i]: (s_q, h_q, d) with h = kvh * group + hh  ->  (h_kv, s_q * group, d)
        qi = q[i].to(accum_dtype).reshape(s_q, h_kv, group, d).permute(1, 0, 2, 3)
        qi = qi.reshape(h_kv, s_q * group, d)

        scores = torch.matmul(qi, keys.transpose(1, 2)) * softmax_scale  # (h_kv, s_q*group, L)
        scores = scores.reshape(h_kv, s_q, group, seqlen)

        if causal and s_q > 1:
            # Token t sees keys j <= seqlen - s_q + t.
            t = torch.arange(s_q, device=device).unsqueeze(1)
            j = torch.arange(seqlen, device=device).unsqueeze(0)
            visible = j <= (seqlen - s_q + t)  # (s_q, L)
            scores = scores.masked_fill(~visible[None, :, None, :], -math.inf)
            has_key = visible.any(dim=1)  # (s_q,)
        else:
            has_key = torch.ones(s_q, dtype=torch.bool, device=device)

        row_lse = torch.logsumexp(scores, dim=-1)  # (h_kv, s_q, group); -inf where no key
        empty = ~has_key[None, :, None]
        safe_lse = torch.where(empty, torch.zeros_like(row_lse), row_lse)
        probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # masked entries: exp(-inf) = 0
        oi = torch.matmul(probs.reshape(h_kv, s_q * group, seqlen), values)  # (h_kv, s_q*g, dv)
        oi = oi.reshape(h_kv, s_q, group, head_dim_v).permute(1, 0, 2, 3)  # (s_q, h_kv, g, dv)
        oi = oi.reshape(s_q, h_q, head_dim_v)
        oi = oi.masked_fill(~has_key[:, None, None], 0.0)

        row_lse = row_lse.masked_fill(empty, math.inf)  # (h_kv, s_q, group)
        row_lse = row_lse.permute(0, 2, 1).reshape(h_q, s_q)  # h = kvh * group + hh

        out[i] = oi.to(torch.float32)
        lse[i] = row_lse.to(torch.float32)
    return out, lse
