"""Writing and reading the FP8 KV-cache formats of flash-mla (plain torch, any device).

Three formats, described byte by byte in ``docs/kv-formats.md``:

* **Dense FP8** (dense decode): ``k_cache`` of ``torch.float8_e4m3fn`` with the usual shape
  ``(num_blocks, page, h_kv, 576)`` and one float32 ``descale_k`` of shape ``(1,)`` for the whole
  tensor; the value used is ``float(k_cache) * descale_k``. Helpers:
  :func:`quantize_kv_cache_fp8`, :func:`dequantize_kv_cache_fp8`, :func:`quantize_q_fp8`,
  :func:`write_kv_fp8`, :func:`used_slots_mask`.
* **V3.2 sparse FP8** (token-sparse decode, ``d_qk = 576``): 656 bytes per token (512 e4m3
  latent bytes, 4 float32 power-of-two scales, 64 bf16 RoPE values), viewed as
  ``(num_blocks, page, 1, 656)``. Helpers: :func:`new_kv_cache_v32`,
  :func:`quantize_kv_cache_v32`, :func:`write_kv_v32`, :func:`dequantize_kv_cache_v32`.
* **512-dim sparse FP8** (token-sparse decode, ``d_qk = 512`` = 448 latent + 64 RoPE): a page
  holds ``page`` records of 576 bytes (448 e4m3 + 64 bf16) followed by ``page`` records of 8
  bytes (7 ue8m0 scale exponents + 1 pad byte), padded to a multiple of 576 bytes, viewed as
  ``(num_blocks, page, 1, 584)``. Helpers: :func:`new_kv_cache_model1`,
  :func:`quantize_kv_cache_model1`, :func:`write_kv_model1`, :func:`dequantize_kv_cache_model1`.

Everything here is ordinary torch and runs wherever its inputs live (CPU or GPU). The
quantizers and dequantizers never synchronize with the host; the ``write_kv_*`` helpers check
their slot indices on the host (one synchronization per call).

Non-finite inputs, everywhere in this module: NaN and +-inf never influence a scale (every
maximum is taken over finite values only). A NaN is stored as the e4m3 NaN code (``0x7f`` /
``0xff``, by sign), an infinity saturates to ``+-448`` times its scale, and RoPE channels (bf16)
are stored unchanged, NaN and infinities included.

This module imports nothing from the compiled extension.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "FP8_E4M3_MAX",
    "V32_BYTES_PER_TOKEN",
    "MODEL1_BYTES_PER_TOKEN",
    "MODEL1_PAGE_ALIGN",
    "fp8_descale_from_amax",
    "quantize_fp8_per_tensor",
    "quantize_kv_cache_fp8",
    "quantize_q_fp8",
    "dequantize_kv_cache_fp8",
    "write_kv_fp8",
    "used_slots_mask",
    "pow2_scale_exponents",
    "new_kv_cache_v32",
    "quantize_kv_cache_v32",
    "write_kv_v32",
    "dequantize_kv_cache_v32",
    "new_kv_cache_model1",
    "model1_page_bytes",
    "quantize_kv_cache_model1",
    "write_kv_model1",
    "dequantize_kv_cache_model1",
    "dequantize_sparse_kv_cache",
]

# ----------------------------------------------------------------------------------------------
# Constants of the formats
# ----------------------------------------------------------------------------------------------

#: Largest finite float8_e4m3fn value.
FP8_E4M3_MAX = 448.0

_DENSE_D = 576

# V3.2 sparse format: per token [512 e4m3 | 4 x float32 scale | 64 x bf16 RoPE].
_V32_D = 576
_V32_NOPE = 512
_V32_ROPE = 64
_V32_GROUP = 128
_V32_NUM_SCALES = _V32_NOPE // _V32_GROUP  # 4
_V32_SCALE_OFFSET = _V32_NOPE  # 512
_V32_ROPE_OFFSET = _V32_NOPE + 4 * _V32_NUM_SCALES  # 528
#: Bytes of one token in the V3.2 sparse FP8 format.
V32_BYTES_PER_TOKEN = _V32_ROPE_OFFSET + 2 * _V32_ROPE  # 656

# 512-dim sparse format: per page [page x (448 e4m3 | 64 x bf16)] [page x (7 x ue8m0 | pad)].
_M1_D = 512
_M1_NOPE = 448
_M1_ROPE = 64
_M1_GROUP = 64
_M1_NUM_SCALES = _M1_NOPE // _M1_GROUP  # 7
_M1_RECORD = _M1_NOPE + 2 * _M1_ROPE  # 576
_M1_SCALE_RECORD = 8
#: Bytes of one token in the 512-dim sparse FP8 format (its data record plus its scale record).
MODEL1_BYTES_PER_TOKEN = _M1_RECORD + _M1_SCALE_RECORD  # 584
#: Pages of the 512-dim format are padded to a multiple of this many bytes.
MODEL1_PAGE_ALIGN = 576

#: Bias of the ue8m0 (float8_e8m0fnu) scale bytes: byte ``e`` means ``2 ** (e - 127)``.
UE8M0_BIAS = 127

_MIN_EXP = -126  # smallest normal float32 / bf16 exponent: every scale stays a normal number
_MAX_EXP = 127

_BYTE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def _fail(msg: str, exc=ValueError):
    raise exc(msg)


def _check(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(msg)


def _check_float(x: torch.Tensor, name: str) -> None:
    _check(isinstance(x, torch.Tensor), f"{name} must be a torch.Tensor", TypeError)
    _check(x.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64),
           f"{name} must be bf16, fp16, float32 or float64, got {x.dtype}", TypeError)


def _as_bytes(x: torch.Tensor, name: str) -> torch.Tensor:
    """A uint8 view of a one-byte tensor (same strides, same storage)."""
    _check(isinstance(x, torch.Tensor), f"{name} must be a torch.Tensor", TypeError)
    _check(x.dtype in _BYTE_DTYPES,
           f"{name} must be uint8, int8 or float8_e4m3fn, got {x.dtype}", TypeError)
    return x if x.dtype == torch.uint8 else x.view(torch.uint8)


def _chunks(n: int, row_elems: int, budget: int = 1 << 24):
    """Ranges over dim 0 holding about ``budget`` elements each (bounds temporary memory)."""
    step = max(1, budget // max(1, row_elems))
    for start in range(0, n, step):
        yield start, min(n, start + step)


# ----------------------------------------------------------------------------------------------
# Dense FP8: one per-tensor scale
# ----------------------------------------------------------------------------------------------


def _finite_amax(x: torch.Tensor, valid_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 0-d tensor: max |x| over finite entries (and over ``valid_mask`` rows if given)."""
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return amax
    row = x[0].numel() if x.dim() > 0 else 1
    x0 = x if x.dim() > 0 else x.reshape(1)
    for start, stop in _chunks(x0.shape[0], row):
        part = x0[start:stop].abs()
        part = torch.where(torch.isfinite(part), part, torch.zeros_like(part))
        if valid_mask is not None:
            m = valid_mask[start:stop]
            m = m.reshape(tuple(m.shape) + (1,) * (part.dim() - m.dim()))
            part = torch.where(m, part, torch.zeros_like(part))
        amax = torch.maximum(amax, part.amax().to(torch.float32))
    return amax


def fp8_descale_from_amax(amax: Union[float, torch.Tensor], device=None) -> torch.Tensor:
    """The per-tensor descale ``amax / 448`` as a float32 ``(1,)`` tensor.

    ``amax`` is the largest magnitude the tensor must represent. ``amax == 0`` (or a
    non-finite / negative amax) gives ``descale = 1.0``: any scale represents an all-zero
    tensor exactly, and 1.0 keeps later writes (:func:`write_kv_fp8`) meaningful.
    """
    a = torch.as_tensor(amax, dtype=torch.float32, device=device).reshape(1)
    descale = a / FP8_E4M3_MAX
    ok = torch.isfinite(descale) & (descale > 0)
    return torch.where(ok, descale, torch.ones_like(descale))


def _to_e4m3(x: torch.Tensor, descale: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """e4m3 of ``x / descale``, saturated to +-448 (NaN stays NaN). Chunked along dim 0."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    d = descale.to(device=x.device, dtype=torch.float32).reshape(())
    if x.numel() == 0:
        return out
    xs = x if x.dim() > 0 else x.reshape(1)
    os_ = out if out.dim() > 0 else out.reshape(1)
    for start, stop in _chunks(xs.shape[0], xs[0].numel()):
        y = xs[start:stop].to(torch.float32) / d
        # clamp keeps NaN; saturating here makes the result independent of how a given torch
        # version casts out-of-range values to e4m3.
        os_[start:stop] = y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return out


def quantize_fp8_per_tensor(
    x: torch.Tensor,
    *,
    valid_mask: Optional[torch.Tensor] = None,
    amax: Optional[Union[float, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize any float tensor to float8_e4m3fn with one per-tensor scale.

    Returns ``(x_fp8, descale)``: ``x_fp8`` has ``x``'s shape, ``descale`` is float32 ``(1,)`` on
    ``x``'s device, and ``float(x_fp8) * descale`` approximates ``x``.

    ``descale = amax / 448`` where ``amax`` is, unless given, the largest finite ``|x|`` (over
    the entries whose leading indices ``valid_mask`` selects, if given: ``valid_mask`` is a
    bool tensor whose shape is a prefix of ``x.shape``). ``amax == 0`` gives ``descale = 1``.
    Entries are stored as ``clamp(x / descale, -448, 448)`` rounded to nearest-even e4m3, so
    magnitudes above ``amax`` (entries outside ``valid_mask``, a too-small given ``amax``,
    infinities) saturate; NaN is stored as NaN.

    Error bound (per entry, for ``|x| <= amax``): ``|x_fp8 * descale - x| <= 2**-4 * |x| +
    2**-10 * descale`` (e4m3 keeps 3 mantissa bits; below ``2**-6`` its steps are ``2**-9``),
    up to float32 rounding of the division (relative ``2**-23``).
    """
    _check_float(x, "x")
    if valid_mask is not None:
        _check(isinstance(valid_mask, torch.Tensor) and valid_mask.dtype == torch.bool,
               "valid_mask must be a bool tensor", TypeError)
        _check(valid_mask.dim() <= x.dim() and tuple(valid_mask.shape) == tuple(x.shape[:valid_mask.dim()]),
               f"valid_mask shape {tuple(valid_mask.shape)} must be a prefix of {tuple(x.shape)}")
        valid_mask = valid_mask.to(x.device)
    if amax is None:
        amax = _finite_amax(x, valid_mask)
    descale = fp8_descale_from_amax(amax, device=x.device)
    return _to_e4m3(x, descale), descale


def quantize_kv_cache_fp8(
    k_cache: torch.Tensor,
    *,
    valid_mask: Optional[torch.Tensor] = None,
    amax: Optional[Union[float, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense FP8 cache from a bf16/fp16 cache ``(num_blocks, page, h_kv, 576)``.

    Returns ``(k_fp8, descale_k)``: ``k_fp8`` float8_e4m3fn of the same shape (contiguous),
    ``descale_k`` float32 ``(1,)`` on the cache's device; the kernel uses
    ``float(k_fp8) * descale_k``.

    Serving caches hold junk in unused slots; pass ``valid_mask`` (bool ``(num_blocks, page)``,
    e.g. from :func:`used_slots_mask`) so that only used slots set the scale, or pass ``amax``
    (a calibrated bound, float or 0-d/1-element tensor) to fix it. Unused slots are still
    converted (saturated), which is harmless: the kernel never reads them. See
    :func:`quantize_fp8_per_tensor` for non-finite values and the error bound.
    """
    _check_float(k_cache, "k_cache")
    _check(k_cache.dim() == 4 and k_cache.shape[-1] == _DENSE_D,
           f"k_cache must be (num_blocks, page, h_kv, {_DENSE_D}), got {tuple(k_cache.shape)}")
    if valid_mask is not None:
        _check(isinstance(valid_mask, torch.Tensor) and valid_mask.dtype == torch.bool,
               "valid_mask must be a bool tensor", TypeError)
        _check(tuple(valid_mask.shape) == tuple(k_cache.shape[:2]),
               f"valid_mask must be (num_blocks, page) = {tuple(k_cache.shape[:2])}, "
               f"got {tuple(valid_mask.shape)}")
    return quantize_fp8_per_tensor(k_cache, valid_mask=valid_mask, amax=amax)


def quantize_q_fp8(
    q: torch.Tensor, *, amax: Optional[Union[float, torch.Tensor]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FP8 query ``(q_fp8, descale_q)`` for dense FP8 decode, with the per-tensor scheme of
    :func:`quantize_fp8_per_tensor` (``descale_q = amax(|q|) / 448``; q used by the kernel is
    ``float(q_fp8) * descale_q``)."""
    _check_float(q, "q")
    _check(q.dim() == 4, f"q must be (b, s_q, h_q, d), got {tuple(q.shape)}")
    return quantize_fp8_per_tensor(q, amax=amax)


def dequantize_kv_cache_fp8(
    k_fp8: torch.Tensor, descale_k: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``float(k_fp8) * descale_k`` in ``dtype`` (computed in float32). Works for q too."""
    _check(isinstance(k_fp8, torch.Tensor) and k_fp8.dtype == torch.float8_e4m3fn,
           "k_fp8 must be a float8_e4m3fn tensor", TypeError)
    d = torch.as_tensor(descale_k, dtype=torch.float32, device=k_fp8.device)
    _check(d.numel() == 1, f"descale_k must hold one value, got shape {tuple(d.shape)}")
    return (k_fp8.to(torch.float32) * d.reshape(())).to(dtype)


def _token_rows(k_new: torch.Tensor, d: int) -> torch.Tensor:
    """New tokens ``(n, d)`` or ``(n, 1, d)`` (one KV head) as ``(n, d)``."""
    _check_float(k_new, "k_new")
    shape_msg = f"k_new must be (n, {d}) or (n, 1, {d}), got {tuple(k_new.shape)}"
    if k_new.dim() == 3:
        _check(k_new.shape[1] == 1, shape_msg)
        k_new = k_new[:, 0]
    _check(k_new.dim() == 2 and k_new.shape[1] == d, shape_msg)
    return k_new


def _flat_slots(slot_mapping: torch.Tensor, capacity: int, n: int):
    """(keep, block, offset): rows with a non-negative slot, checked against the capacity."""
    _check(isinstance(slot_mapping, torch.Tensor) and not slot_mapping.is_floating_point()
           and slot_mapping.dtype != torch.bool, "slot_mapping must be an integer tensor", TypeError)
    _check(slot_mapping.dim() == 1 and slot_mapping.shape[0] == n,
           f"slot_mapping must be ({n},), got {tuple(slot_mapping.shape)}")
    slots = slot_mapping.to(torch.int64)
    _check(not bool((slots >= capacity).any()),
           f"slot_mapping holds a slot >= num_blocks * page = {capacity}")
    keep = slots >= 0  # negative slots (padding tokens) are skipped
    return keep, slots


def write_kv_fp8(
    k_fp8_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_new: torch.Tensor,
    descale_k: torch.Tensor,
) -> None:
    """Write new tokens into a dense FP8 cache, in place, with the cache's existing scale.

    ``k_fp8_cache`` ``(num_blocks, page, h_kv, 576)`` float8_e4m3fn (any strides);
    ``slot_mapping`` ``(n,)`` integer, slot ``s`` = slot ``s % page`` of page ``s // page``
    (negative slots are skipped); ``k_new`` ``(n, h_kv, 576)`` float. Stored values are
    ``clamp(k_new / descale_k, -448, 448)`` in e4m3: a token larger than ``448 * descale_k``
    saturates, so choose ``descale_k`` with headroom (e.g. from a calibrated ``amax``).
    """
    _check(isinstance(k_fp8_cache, torch.Tensor) and k_fp8_cache.dtype == torch.float8_e4m3fn,
           "k_fp8_cache must be a float8_e4m3fn tensor", TypeError)
    _check(k_fp8_cache.dim() == 4, f"k_fp8_cache must be 4-D, got {tuple(k_fp8_cache.shape)}")
    nb, page, h_kv, d = k_fp8_cache.shape
    _check_float(k_new, "k_new")
    _check(k_new.dim() == 3 and tuple(k_new.shape[1:]) == (h_kv, d),
           f"k_new must be (n, {h_kv}, {d}), got {tuple(k_new.shape)}")
    keep, slots = _flat_slots(slot_mapping.to(k_fp8_cache.device), nb * page, k_new.shape[0])
    d_ = torch.as_tensor(descale_k, dtype=torch.float32, device=k_fp8_cache.device)
    vals = _to_e4m3(k_new.to(k_fp8_cache.device), d_).view(torch.uint8)
    slots, vals = slots[keep], vals[keep]
    k_fp8_cache.view(torch.uint8)[slots // page, slots % page] = vals


def used_slots_mask(
    block_table: torch.Tensor, cache_seqlens: torch.Tensor, num_blocks: int, page_size: int
) -> torch.Tensor:
    """bool ``(num_blocks, page_size)``: the cache slots some request reads (its tokens
    ``0 .. L-1`` through its ``block_table`` row). Block-table entries past ``ceil(L / page)``
    and entries outside ``0 .. num_blocks-1`` are ignored. No host synchronization."""
    _check(block_table.dim() == 2 and cache_seqlens.dim() == 1
           and block_table.shape[0] == cache_seqlens.shape[0],
           "block_table must be (b, max_blocks) and cache_seqlens (b,)")
    device = block_table.device
    b, max_blocks = block_table.shape
    cap = num_blocks * page_size
    j = torch.arange(max_blocks * page_size, device=device)
    lens = cache_seqlens.to(device=device, dtype=torch.int64).reshape(b, 1)
    pages = block_table.to(torch.int64)[:, j // page_size]  # (b, max_blocks * page)
    ok = (j.reshape(1, -1) < lens) & (pages >= 0) & (pages < num_blocks)
    flat = torch.where(ok, pages * page_size + (j % page_size).reshape(1, -1),
                       torch.full_like(pages, cap))
    hits = torch.zeros(cap + 1, dtype=torch.int32, device=device)
    hits.index_add_(0, flat.reshape(-1), torch.ones(flat.numel(), dtype=torch.int32, device=device))
    return (hits[:cap] > 0).reshape(num_blocks, page_size)


# ----------------------------------------------------------------------------------------------
# Power-of-two group scales (both sparse formats)
# ----------------------------------------------------------------------------------------------


def pow2_scale_exponents(amax: torch.Tensor, min_exponent: int = _MIN_EXP) -> torch.Tensor:
    """int32 ``e = ceil(log2(amax / 448))`` elementwise, clamped to ``[min_exponent, 127]``.

    Computed exactly (float64 division and ``frexp``, no ``log2`` rounding), so
    ``amax <= 448 * 2**e`` always holds and ``amax > 224 * 2**e`` unless clamped.
    ``amax == 0`` gives ``min_exponent``. ``min_exponent`` defaults to -126 (the smallest
    normal float32 / bf16 exponent); FlashMLA's own test quantizer effectively uses -13 (it
    clamps ``amax / 448`` to at least ``1e-4``); both produce valid caches.
    """
    _check(-126 <= min_exponent <= 127, "min_exponent must be in -126..127")
    ratio = amax.to(torch.float64) / FP8_E4M3_MAX
    mant, exp = torch.frexp(ratio)  # ratio = mant * 2**exp, mant in [0.5, 1) (0 for ratio 0)
    e = torch.where(mant == 0.5, exp - 1, exp)  # exact powers of two: log2 is exp - 1
    e = torch.where(ratio > 0, e, torch.full_like(e, min_exponent))
    return e.clamp(min_exponent, _MAX_EXP).to(torch.int32)


def _pow2_float(e: torch.Tensor) -> torch.Tensor:
    """float32 ``2**e`` for int32 ``e`` in -126..127, built from its bits (exact)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _quantize_groups(x: torch.Tensor, group: int, min_exponent: int):
    """``x`` (..., G*group) float -> (e4m3 bytes (..., G*group) uint8, exponents (..., G) int32)."""
    xf = x.to(torch.float32)
    g = xf.reshape(*xf.shape[:-1], -1, group)
    a = g.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax(dim=-1)
    e = pow2_scale_exponents(a, min_exponent)
    scaled = g / _pow2_float(e).unsqueeze(-1)  # division by a power of two: exact
    # Saturate at 448, except for the top exponent 120 (only amax above 448 * 2**119, near the
    # float32 maximum, gets it): there 256 * 2**120 = 2**128 would dequantize to inf, so the
    # largest code kept is 240 (1.875 * 2**127; still within 2**-4 of any finite float32).
    limit = torch.where(e >= 120, 240.0, FP8_E4M3_MAX).to(torch.float32).unsqueeze(-1)
    q = torch.maximum(torch.minimum(scaled, limit), -limit).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).reshape(xf.shape), e


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of ``x`` as bf16: (..., n) -> (..., 2n) uint8."""
    return x.to(torch.bfloat16).contiguous().view(torch.uint8)


def _bytes_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the last dim of a uint8 tensor (any strides) as ``dtype`` (little-endian)."""
    return x.contiguous().view(dtype)


def _e4m3_bytes_to_float(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.float8_e4m3fn).to(torch.float32)


def _new_paged(num_blocks: int, page: int, row: int, page_stride: int, dtype, device) -> torch.Tensor:
    """A zero-filled byte cache of ``row``-byte token records, pages ``page_stride`` bytes apart."""
    _check(page_stride >= page * row, f"page_stride must be >= page * {row} = {page * row}")
    _check(dtype in _BYTE_DTYPES, f"dtype must be uint8, int8 or float8_e4m3fn, got {dtype}", TypeError)
    _check(num_blocks >= 1 and page >= 1, "num_blocks and page must be >= 1")
    raw = torch.zeros((num_blocks, page_stride), dtype=torch.uint8, device=device)
    view = raw.as_strided((num_blocks, page, 1, row), (page_stride, row, row, 1))
    return view if dtype == torch.uint8 else view.view(dtype)


# ----------------------------------------------------------------------------------------------
# V3.2 sparse FP8: 656 bytes per token
# ----------------------------------------------------------------------------------------------


def _v32_encode(x: torch.Tensor, min_exponent: int) -> torch.Tensor:
    """(..., 576) float -> (..., 656) uint8 token records."""
    nope, e = _quantize_groups(x[..., :_V32_NOPE], _V32_GROUP, min_exponent)
    scales = _pow2_float(e).contiguous().view(torch.uint8)  # (..., 16)
    rope = _bf16_bytes(x[..., _V32_NOPE:])  # (..., 128)
    return torch.cat([nope, scales, rope], dim=-1)


def _v32_decode(b: torch.Tensor) -> torch.Tensor:
    """(..., 656) uint8 (any strides) -> (..., 576) float32."""
    nope = _e4m3_bytes_to_float(b[..., :_V32_NOPE])
    scales = _bytes_to(b[..., _V32_SCALE_OFFSET:_V32_ROPE_OFFSET], torch.float32)  # (..., 4)
    rope = _bytes_to(b[..., _V32_ROPE_OFFSET:V32_BYTES_PER_TOKEN], torch.bfloat16).to(torch.float32)
    nope = (nope.reshape(*nope.shape[:-1], _V32_NUM_SCALES, _V32_GROUP) * scales.unsqueeze(-1))
    return torch.cat([nope.reshape(*b.shape[:-1], _V32_NOPE), rope], dim=-1)


def new_kv_cache_v32(
    num_blocks: int,
    page: int,
    *,
    page_stride: Optional[int] = None,
    dtype: torch.dtype = torch.uint8,
    device=None,
) -> torch.Tensor:
    """A zero-filled V3.2 sparse FP8 cache ``(num_blocks, page, 1, 656)``.

    ``page_stride`` (bytes between pages, default ``page * 656``) may be larger to pad pages;
    the result is then a strided view into a ``(num_blocks, page_stride)`` byte buffer.
    ``dtype`` is any one-byte dtype the kernel accepts (uint8, int8, float8_e4m3fn).
    """
    if page_stride is None:
        page_stride = page * V32_BYTES_PER_TOKEN
    return _new_paged(num_blocks, page, V32_BYTES_PER_TOKEN, page_stride, dtype, device)


def quantize_kv_cache_v32(
    k_cache: torch.Tensor,
    *,
    page_stride: Optional[int] = None,
    dtype: torch.dtype = torch.uint8,
    min_exponent: int = _MIN_EXP,
) -> torch.Tensor:
    """V3.2 sparse FP8 cache ``(num_blocks, page, 1, 656)`` from a float cache
    ``(num_blocks, page, 1, 576)`` (bf16 normally; fp16/float32 accepted, RoPE is stored as bf16).

    Per token: channels ``128k .. 128k+127`` (k = 0..3) share the float32 scale
    ``s_k = 2**ceil(log2(amax_k / 448))`` (``amax_k`` over finite values; exponent clamped to
    ``[min_exponent, 127]``, so an all-zero group gets ``2**min_exponent``), stored as
    ``e4m3(x / s_k)``. Channels 512..575 are stored as bf16. See :func:`new_kv_cache_v32` for
    ``page_stride`` and ``dtype``.

    Error bound (latent channels, finite input): ``|deq - x| <= 2**-4 * |x|`` when
    ``|x| >= 2**-6 * s_k``, else ``<= 2**-10 * s_k``; RoPE channels are exact for bf16 input.
    """
    _check_float(k_cache, "k_cache")
    _check(k_cache.dim() == 4 and k_cache.shape[2] == 1 and k_cache.shape[3] == _V32_D,
           f"k_cache must be (num_blocks, page, 1, {_V32_D}), got {tuple(k_cache.shape)}")
    nb, page = k_cache.shape[:2]
    out = new_kv_cache_v32(nb, page, page_stride=page_stride, dtype=torch.uint8, device=k_cache.device)
    for start, stop in _chunks(nb, page * _V32_D):
        out[start:stop] = _v32_encode(k_cache[start:stop], min_exponent)
    return out if dtype == torch.uint8 else out.view(dtype)


def write_kv_v32(
    k_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_new: torch.Tensor,
    *,
    min_exponent: int = _MIN_EXP,
) -> None:
    """Quantize new tokens ``k_new`` ``(n, 576)`` (or ``(n, 1, 576)``) into a V3.2 sparse FP8
    cache ``(num_blocks, page, 1, 656)`` in place, token ``r`` at slot ``slot_mapping[r]``
    (slot ``s % page`` of page ``s // page``; negative slots skipped). Each token is quantized
    on its own, exactly as :func:`quantize_kv_cache_v32` would."""
    u8 = _as_bytes(k_cache, "k_cache")
    _check(u8.dim() == 4 and u8.shape[2] == 1 and u8.shape[3] == V32_BYTES_PER_TOKEN,
           f"k_cache must be (num_blocks, page, 1, {V32_BYTES_PER_TOKEN}), got {tuple(u8.shape)}")
    k_new = _token_rows(k_new, _V32_D)
    nb, page = u8.shape[:2]
    keep, slots = _flat_slots(slot_mapping.to(u8.device), nb * page, k_new.shape[0])
    rec = _v32_encode(k_new.to(u8.device), min_exponent)
    slots, rec = slots[keep], rec[keep]
    u8[slots // page, slots % page, 0] = rec


def dequantize_kv_cache_v32(k_cache: torch.Tensor) -> torch.Tensor:
    """float32 ``(num_blocks, page, 1, 576)`` from a V3.2 sparse FP8 cache
    ``(num_blocks, page, 1, 656)`` of uint8 / int8 / float8_e4m3fn with any strides (the last
    dim must be contiguous; padded page strides are fine)."""
    u8 = _as_bytes(k_cache, "k_cache")
    _check(u8.dim() == 4 and u8.shape[3] == V32_BYTES_PER_TOKEN,
           f"k_cache must be (num_blocks, page, h_kv, {V32_BYTES_PER_TOKEN}), got {tuple(u8.shape)}")
    _check(u8.stride(3) == 1, "k_cache's last dim must be contiguous")
    return _v32_decode(u8)


# ----------------------------------------------------------------------------------------------
# 512-dim sparse FP8: per page, page x 576-byte records then page x 8-byte scale records
# ----------------------------------------------------------------------------------------------


def model1_page_bytes(page: int) -> int:
    """Default bytes per page of the 512-dim format: ``page * 584`` rounded up to a multiple
    of 576."""
    raw = page * MODEL1_BYTES_PER_TOKEN
    return -(-raw // MODEL1_PAGE_ALIGN) * MODEL1_PAGE_ALIGN


def _model1_encode(x: torch.Tensor, min_exponent: int):
    """(..., 512) float -> (data records (..., 576) uint8, scale records (..., 8) uint8)."""
    nope, e = _quantize_groups(x[..., :_M1_NOPE], _M1_GROUP, min_exponent)
    rope = _bf16_bytes(x[..., _M1_NOPE:])  # (..., 128)
    data = torch.cat([nope, rope], dim=-1)
    ue8m0 = (e + UE8M0_BIAS).to(torch.uint8)  # (..., 7), bytes 1..254
    pad = torch.zeros((*ue8m0.shape[:-1], _M1_SCALE_RECORD - _M1_NUM_SCALES),
                      dtype=torch.uint8, device=ue8m0.device)
    return data, torch.cat([ue8m0, pad], dim=-1)


def _ue8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(b - 127)`` of ue8m0 bytes; byte 0 is ``2**-127``, byte 255 is NaN."""
    bi = b.to(torch.int32)
    normal = (bi.clamp(1, 254) << 23).view(torch.float32)
    out = torch.where(bi == 0, torch.full_like(normal, 2.0 ** -127), normal)
    return torch.where(bi == 255, torch.full_like(normal, math.nan), out)


def _model1_regions(u8: torch.Tensor):
    """Writable views (data (nb, page, 576), scales (nb, page, 8)) of a 512-dim cache's pages."""
    _check(u8.dim() == 4 and u8.shape[2] == 1 and u8.shape[3] == MODEL1_BYTES_PER_TOKEN,
           f"k_cache must be (num_blocks, page, 1, {MODEL1_BYTES_PER_TOKEN}), got {tuple(u8.shape)}")
    nb, page = u8.shape[:2]
    _check(u8.stride(3) == 1 and (page == 1 or u8.stride(1) == MODEL1_BYTES_PER_TOKEN),
           "k_cache must view whole pages: its token stride must be 584 bytes and its last dim "
           "contiguous")
    stride0 = u8.stride(0) if nb > 1 else page * MODEL1_BYTES_PER_TOKEN
    _check(stride0 >= page * MODEL1_BYTES_PER_TOKEN,
           f"k_cache's page stride ({stride0}) must be >= page * 584 = {page * MODEL1_BYTES_PER_TOKEN}")
    pages = u8.as_strided((nb, page * MODEL1_BYTES_PER_TOKEN), (stride0, 1))
    data = pages[:, : page * _M1_RECORD].view(nb, page, _M1_RECORD)
    scales = pages[:, page * _M1_RECORD:].view(nb, page, _M1_SCALE_RECORD)
    return data, scales


def new_kv_cache_model1(
    num_blocks: int,
    page: int,
    *,
    page_stride: Optional[int] = None,
    dtype: torch.dtype = torch.uint8,
    device=None,
) -> torch.Tensor:
    """A zero-filled 512-dim sparse FP8 cache, viewed as ``(num_blocks, page, 1, 584)``.

    Each page is ``page_stride`` bytes (default :func:`model1_page_bytes`, ``page * 584``
    rounded up to a multiple of 576, as FlashMLA lays it out); the view's page stride is
    ``page_stride`` and its token stride 584.
    """
    if page_stride is None:
        page_stride = model1_page_bytes(page)
    return _new_paged(num_blocks, page, MODEL1_BYTES_PER_TOKEN, page_stride, dtype, device)


def quantize_kv_cache_model1(
    k_cache: torch.Tensor,
    *,
    page_stride: Optional[int] = None,
    dtype: torch.dtype = torch.uint8,
    min_exponent: int = _MIN_EXP,
) -> torch.Tensor:
    """512-dim sparse FP8 cache ``(num_blocks, page, 1, 584)`` (a view of padded pages) from a
    float cache ``(num_blocks, page, 1, 512)`` (channels 0..447 latent, 448..511 RoPE).

    Per token: latent channels ``64k .. 64k+63`` (k = 0..6) share the scale
    ``2**e_k``, ``e_k = ceil(log2(amax_k / 448))`` clamped to ``[min_exponent, 127]``, stored as
    the ue8m0 byte ``e_k + 127``; values stored as ``e4m3(x / 2**e_k)``; RoPE as bf16. Same
    error bound as :func:`quantize_kv_cache_v32` with 64-channel groups.
    """
    _check_float(k_cache, "k_cache")
    _check(k_cache.dim() == 4 and k_cache.shape[2] == 1 and k_cache.shape[3] == _M1_D,
           f"k_cache must be (num_blocks, page, 1, {_M1_D}), got {tuple(k_cache.shape)}")
    nb, page = k_cache.shape[:2]
    out = new_kv_cache_model1(nb, page, page_stride=page_stride, dtype=torch.uint8, device=k_cache.device)
    data, scales = _model1_regions(out)
    for start, stop in _chunks(nb, page * _M1_D):
        d, s = _model1_encode(k_cache[start:stop, :, 0], min_exponent)
        data[start:stop] = d
        scales[start:stop] = s
    return out if dtype == torch.uint8 else out.view(dtype)


def write_kv_model1(
    k_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_new: torch.Tensor,
    *,
    min_exponent: int = _MIN_EXP,
) -> None:
    """Quantize new tokens ``k_new`` ``(n, 512)`` (or ``(n, 1, 512)``) into a 512-dim sparse FP8
    cache in place: token ``r`` goes to slot ``slot_mapping[r]`` (negative slots skipped); its
    576-byte record and its 8-byte scale record are written to their two places in the page."""
    u8 = _as_bytes(k_cache, "k_cache")
    data, scales = _model1_regions(u8)
    k_new = _token_rows(k_new, _M1_D)
    nb, page = u8.shape[:2]
    keep, slots = _flat_slots(slot_mapping.to(u8.device), nb * page, k_new.shape[0])
    d, s = _model1_encode(k_new.to(u8.device), min_exponent)
    slots, d, s = slots[keep], d[keep], s[keep]
    blk, off = slots // page, slots % page
    data[blk, off] = d
    scales[blk, off] = s


def dequantize_kv_cache_model1(k_cache: torch.Tensor) -> torch.Tensor:
    """float32 ``(num_blocks, page, 1, 512)`` from a 512-dim sparse FP8 cache view
    ``(num_blocks, page, 1, 584)`` (uint8 / int8 / float8_e4m3fn; token stride 584, any page
    stride >= ``page * 584``). The pad byte of each scale record is ignored."""
    u8 = _as_bytes(k_cache, "k_cache")
    data, scales = _model1_regions(u8)
    nope = _e4m3_bytes_to_float(data[..., :_M1_NOPE])
    rope = _bytes_to(data[..., _M1_NOPE:], torch.bfloat16).to(torch.float32)
    s = _ue8m0_to_float(scales[..., :_M1_NUM_SCALES])
    nope = nope.reshape(*nope.shape[:-1], _M1_NUM_SCALES, _M1_GROUP) * s.unsqueeze(-1)
    out = torch.cat([nope.reshape(*data.shape[:-1], _M1_NOPE), rope], dim=-1)
    return out.unsqueeze(2)


def dequantize_sparse_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """float32 cache of any token-sparse format: a float cache is converted, a one-byte cache
    with last dim 656 is read as V3.2 and one with last dim 584 as the 512-dim format."""
    if k_cache.is_floating_point() and k_cache.dtype != torch.float8_e4m3fn:
        return k_cache.to(torch.float32)
    if k_cache.shape[-1] == V32_BYTES_PER_TOKEN:
        return dequantize_kv_cache_v32(k_cache)
    if k_cache.shape[-1] == MODEL1_BYTES_PER_TOKEN:
        return dequantize_kv_cache_model1(k_cache)
    _fail(f"a one-byte sparse cache must have last dim {V32_BYTES_PER_TOKEN} or "
          f"{MODEL1_BYTES_PER_TOKEN}, got {k_cache.shape[-1]}")
