"""GPU correctness of token-sparse decode: ``flash_mla_with_kvcache`` with ``indices``.

The call (FlashMLA's later-release positional order, a scheduler object from
``get_mla_metadata()``)::

    out, lse = flash_mla_with_kvcache(q, k_cache, None, None, 512, sched, None, softmax_scale,
                                      False, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
                                      extra_indices_in_kvcache, topk_length, extra_topk_length,
                                      kernel=..., out=..., lse=...)

Every result is compared with ``flash_mla.sparse_reference.sparse_decode_reference`` (float32
accumulation) over the cache as the kernel must read it: the bf16 cache itself, or the FP8 cache
dequantized by ``flash_mla.kv_formats.dequantize_sparse_kv_cache``. The dequantized values (e4m3
times a power of two) are exact in bf16, so every format is held to the bf16 bounds of
conftest.assert_decode_matches (relative error 1e-2 over the tensor and per row of 512 values,
2e-2 of the row's largest value per element, lse within 2e-3; rows with no valid key exactly
out 0 / lse +inf; nothing else non-finite). ``test_checker_catches_one_missing_key`` shows these
bounds fail a result that lacks a single one of 64 keys (the one with the least weight).

Covered:

* the formats: bf16 caches of 576 and 512 channels, the V3.2 FP8 format (656 bytes per token)
  and the 512-dim FP8 format (584), the FP8 caches as uint8, int8 and float8_e4m3fn bytes;
* topk 1, 7, 64, 100, 2048 and one 16384 case; page sizes 1, 2, 61, 64, 69, 256 and 576;
  padded page strides; h_q 1, 3, 16, 33, 64, 128; s_q 1, 2, 4; strided q;
* indices: -1, other negatives (down to INT_MIN), too large ones (the capacity, INT_MAX, ...),
  duplicates, the first and last token of the cache; rows and whole calls with no valid key;
* topk_length 0, partial and full (and out-of-range values, clamped); the second cache with its
  own page size, indices and lengths (alone, together, empty); +inf, -inf and finite sinks;
* the V3.2 widening value by value: every finite e4m3 byte under power-of-two, arbitrary and
  large group scales (one selected key, so out is its V), within bf16 rounding;
* NaN poison: every cache slot that no valid index selects (and every padding byte) holds NaN
  (bf16 NaN; for FP8 the e4m3 NaN codes 0x7f / 0xff, NaN scale bytes and NaN RoPE values), and
  the preallocated out= / lse= are NaN-filled with NaN neighbours that must stay untouched;
* the portable kernels "sm80_large" and "sm80_small" on every case, the Hopper kernel "sm90" on
  every V3.2 case, "auto" picking one of them, "sm90" refused for the other formats; CUDA graph capture and replay with new indices, cache contents, lengths and
  sinks; bitwise determinism; the byte dtype and page padding of a cache changing no bit; one
  scheduler object reused by two layers, and refused for another b, s_q, h_q, topk or format.

The whole module is skipped without a CUDA GPU (checked before importing flash_mla).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
from typing import Optional, Tuple

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("flash-mla GPU tests need a CUDA GPU", allow_module_level=True)

import flash_mla  # noqa: E402
from flash_mla import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from flash_mla import kv_formats as kvf  # noqa: E402
from flash_mla.sparse_reference import sparse_decode_reference  # noqa: E402

from conftest import (  # noqa: E402  (tests/python is on sys.path)
    assert_bitwise_equal,
    assert_decode_matches,
    capture_graph,
    fp8_nan_codes,
)

pytestmark = pytest.mark.requires_gpu

DEVICE = "cuda"
DV = 512
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
NAN = float("nan")
INF = float("inf")
INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1

KERNELS = ("sm80_large", "sm80_small")  # the portable kernels: every format
HOPPER_FORMATS = ("v32", "bf16_576")  # the formats the "sm90" kernel takes
ALL_KERNELS = KERNELS + ("sm90",)
D_QK = {"bf16_576": 576, "bf16_512": 512, "v32": 576, "model1": 512}
FP8_FORMATS = ("v32", "model1")
ROW_BYTES = {"v32": kvf.V32_BYTES_PER_TOKEN, "model1": kvf.MODEL1_BYTES_PER_TOKEN}  # 656, 584


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def kernel_skip_reason(kernel: str):
    """None if the library can run ``kernel`` on this GPU (its own answer), else why not."""
    try:
        flash_mla.kernel_for_device(kernel=kernel)
    except (RuntimeError, ValueError) as err:
        return f"kernel {kernel!r} does not run on this GPU / build: {err}"
    return None


def sparse_kernels(fmt: str):
    """The kernels this GPU runs for format ``fmt``: the portable ones, and "sm90" for the V3.2
    format on Hopper; skips if none."""
    kernels = [k for k in KERNELS if kernel_skip_reason(k) is None]
    if fmt in HOPPER_FORMATS and kernel_skip_reason("sm90") is None:
        kernels.append("sm90")
    if not kernels:
        pytest.skip("no token-sparse kernel runs on this GPU")
    return kernels


def skip_unless_runs(kernel: str, fmt: str) -> None:
    """Skips a test of ``kernel`` on format ``fmt`` where that kernel does not run it."""
    if kernel == "sm90" and fmt not in HOPPER_FORMATS:
        pytest.skip(f"the sm90 kernel does not take the {fmt} format")
    reason = kernel_skip_reason(kernel)
    if reason:
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------------
# caches
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SparseCache:
    """A cache in one of the formats: ``k`` is what the kernel gets, ``raw`` the whole buffer
    behind it (page padding included; the FP8 formats' raw is (num_blocks, page_stride) uint8),
    ``values`` the bf16 values it was made from (NaN poison not included)."""

    fmt: str
    k: torch.Tensor
    raw: torch.Tensor
    values: torch.Tensor
    pad: bool

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def page(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.page

    def dequantized(self) -> torch.Tensor:
        """float32 (num_blocks, page, 1, d_qk): what the kernel must read (NaN where poisoned)."""
        return kvf.dequantize_sparse_kv_cache(self.k)

    def describe(self) -> str:
        pad = ""
        if self.fmt in FP8_FORMATS:
            pad = f" page_stride={self.raw.shape[1]}"
        elif self.raw.shape != self.k.shape:
            pad = " padded"
        return f"{self.fmt} {self.k.dtype} nb={self.num_blocks} page={self.page}{pad}"


def random_values(fmt: str, num_blocks: int, page: int, gen: torch.Generator) -> torch.Tensor:
    """bf16 (num_blocks, page, 1, d_qk) randn values."""
    return torch.randn((num_blocks, page, 1, D_QK[fmt]), generator=gen, device=DEVICE).to(BF16)


def build_cache(fmt: str, values: torch.Tensor, *, pad: bool = False,
                byte_dtype: torch.dtype = torch.uint8) -> SparseCache:
    """``values`` in format ``fmt``. ``pad``: pages further apart than they need to be (bf16:
    one NaN token row before and two after each page; V3.2: 1,024 extra bytes a page; 512-dim:
    two extra 576-byte blocks a page). Every padding byte is poisoned (NaN / 0xff)."""
    nb, page = values.shape[:2]
    if fmt.startswith("bf16"):
        if pad:
            raw = torch.full((nb, page + 3, 1, values.shape[-1]), NAN, dtype=BF16, device=DEVICE)
            k = raw[:, 1:page + 1]
        else:
            raw = torch.empty(values.shape, dtype=BF16, device=DEVICE)
            k = raw
        k.copy_(values)
        return SparseCache(fmt, k, raw, values, pad)
    if fmt == "v32":
        stride = page * kvf.V32_BYTES_PER_TOKEN + (1024 if pad else 0)
        k = kvf.quantize_kv_cache_v32(values, page_stride=stride, dtype=byte_dtype)
    elif fmt == "model1":
        stride = kvf.model1_page_bytes(page) + (2 * kvf.MODEL1_PAGE_ALIGN if pad else 0)
        k = kvf.quantize_kv_cache_model1(values, page_stride=stride, dtype=byte_dtype)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    assert k.dtype == byte_dtype and k.shape == (nb, page, 1, ROW_BYTES[fmt])
    assert k.storage_offset() == 0 and k.untyped_storage().nbytes() == nb * stride
    raw = k.view(torch.uint8).as_strided((nb, stride), (stride, 1), 0)
    used = page * ROW_BYTES[fmt]
    if stride > used:
        raw[:, used:] = 0xFF  # page padding: NaN in every field
    return SparseCache(fmt, k, raw, values, pad)


def _records(cache: SparseCache):
    """uint8 views of the per-token records: V3.2 (nb, page, 656); 512-dim (data (nb, page, 576),
    scales (nb, page, 8)), as docs/kv-formats.md lays them out."""
    nb, page = cache.num_blocks, cache.page
    if cache.fmt == "v32":
        return cache.raw[:, :page * 656].view(nb, page, 656)
    data = cache.raw[:, :page * 576].view(nb, page, 576)
    scales = cache.raw[:, page * 576:page * 584].view(nb, page, 8)
    return data, scales


def poison_unselected(cache: SparseCache, selected: torch.Tensor, gen: torch.Generator) -> None:
    """NaN in every slot not in ``selected`` ((nb, page) bool): bf16 NaN; FP8 formats: e4m3 bytes
    0x7f / 0xff at random, scale bytes 0xff (float32 NaN / ue8m0 NaN), RoPE bytes 0xff (bf16 NaN)."""
    unsel = ~selected
    n = int(unsel.sum())
    if n:
        if cache.fmt.startswith("bf16"):
            cache.k[unsel] = NAN
        elif cache.fmt == "v32":
            rec = torch.full((n, 656), 0xFF, dtype=torch.uint8, device=DEVICE)
            rec[:, :512] = fp8_nan_codes((n, 512), gen, DEVICE)
            _records(cache)[unsel] = rec
        else:
            data, scales = _records(cache)
            rec = torch.full((n, 576), 0xFF, dtype=torch.uint8, device=DEVICE)
            rec[:, :448] = fp8_nan_codes((n, 448), gen, DEVICE)
            data[unsel] = rec
            scales[unsel] = 0xFF
    deq = cache.dequantized()
    assert torch.isnan(deq[unsel]).all(), "poisoned slots must read as NaN"
    assert torch.isfinite(deq[selected]).all(), "a selected slot is not finite"


def rewrite_cache(cache: SparseCache, selected: torch.Tensor, gen: torch.Generator) -> None:
    """In place (same buffer, same layout): the cache rebuilt from its ``values``, then every slot
    outside ``selected`` poisoned. For changed indices / lengths / values of a problem."""
    byte_dtype = cache.k.dtype if cache.fmt in FP8_FORMATS else torch.uint8
    clean = build_cache(cache.fmt, cache.values, pad=cache.pad, byte_dtype=byte_dtype)
    assert clean.raw.shape == cache.raw.shape and clean.k.stride() == cache.k.stride()
    cache.raw.copy_(clean.raw)
    poison_unselected(cache, selected, gen)


# ----------------------------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One token-sparse problem shape.

    lengths: None (no topk_length), "full", "zeros" or "mixed" (0, topk and partial values);
    sink: None, "finite" or "inf" (finite, +inf and -inf heads); extra: (page, topk, lengths) of
    the second cache, or None; invalid: fraction of junk (invalid) indices; empty_row: the last
    (request, token) gets no valid index in either cache.
    """

    name: str
    fmt: str
    b: int
    s_q: int
    h_q: int
    topk: int
    page: int
    pad: bool = False
    byte_dtype: torch.dtype = torch.uint8
    lengths: Optional[str] = None
    sink: Optional[str] = None
    extra: Optional[Tuple[int, int, Optional[str]]] = None
    q_layout: str = "contiguous"
    scale_mult: float = 1.0
    invalid: float = 0.25
    empty_row: bool = True


@dataclasses.dataclass
class Problem:
    spec: Spec
    q: torch.Tensor
    main: SparseCache
    indices: torch.Tensor
    topk_length: Optional[torch.Tensor]
    extra: Optional[SparseCache]
    extra_indices: Optional[torch.Tensor]
    extra_topk_length: Optional[torch.Tensor]
    sink: Optional[torch.Tensor]
    softmax_scale: float

    @property
    def fp8(self) -> bool:
        return self.spec.fmt in FP8_FORMATS

    @property
    def b(self) -> int:
        return self.q.shape[0]

    @property
    def s_q(self) -> int:
        return self.q.shape[1]

    @property
    def h_q(self) -> int:
        return self.q.shape[2]

    def describe(self) -> str:
        s = self.spec
        extra = f" extra=[{self.extra.describe()} topk={self.extra_indices.shape[-1]}]" if self.extra else ""
        return (f"{s.name}: b={self.b} s_q={self.s_q} h_q={self.h_q} topk={self.indices.shape[-1]} "
                f"[{self.main.describe()}] lengths={s.lengths} sink={s.sink} q={s.q_layout}{extra}")


def junk_pool(capacity: int, page: int):
    """Invalid indices: -1 (most often), other negatives, the capacity and beyond (values whose
    byte offsets overflow 32 bits included)."""
    return [-1, -1, -1, -1, -2, -page, -page - 1, -capacity, INT_MIN, INT_MIN + 1,
            capacity, capacity + 1, capacity + page, 2 ** 30, INT_MAX - page + 1, INT_MAX]


def make_indices(b, s_q, topk, capacity, page, gen, *, invalid=0.25, edges=True) -> torch.Tensor:
    """int32 (b, s_q, topk): valid tokens at random, a fraction ``invalid`` of junk, ~10 %
    duplicates; the first row starts with the cache's first and last tokens, a page's last and
    the next page's first token, and a duplicated pair."""
    shape = (b, s_q, topk)
    idx = torch.randint(0, capacity, shape, generator=gen, device=DEVICE)
    pool = torch.tensor(junk_pool(capacity, page), dtype=torch.int64, device=DEVICE)
    junk = pool[torch.randint(0, pool.numel(), shape, generator=gen, device=DEVICE)]
    idx = torch.where(torch.rand(shape, generator=gen, device=DEVICE) < invalid, junk, idx)
    if topk >= 2:
        src = torch.randint(0, topk, shape, generator=gen, device=DEVICE)
        dup = torch.rand(shape, generator=gen, device=DEVICE) < 0.1
        idx = torch.where(dup, idx.gather(-1, src), idx)
    if edges:
        first = [0, capacity - 1, page - 1, min(page, capacity - 1), capacity // 2, capacity // 2]
        n = min(topk, len(first))
        idx[0, 0, :n] = torch.tensor(first[:n], device=DEVICE)
    return idx.to(torch.int32)


def make_lengths(mode, b, topk, rng: random.Random) -> Optional[torch.Tensor]:
    if mode is None:
        return None
    if mode == "full":
        lens = [topk] * b
    elif mode == "zeros":
        lens = [0] * b
    elif mode == "mixed":
        pattern = [rng.randint(1, max(1, topk - 1)), 0, topk, rng.randint(0, topk)]
        lens = [pattern[i % len(pattern)] for i in range(b)]
        rng.shuffle(lens)
    else:
        raise ValueError(mode)
    return torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def make_sink(mode, h_q, topk, gen) -> Optional[torch.Tensor]:
    """float32 (h_q,): values around log(topk) (the lse's range) so that the factor
    1 / (1 + exp(sink - lse)) spans (0, 1); "inf" cycles finite, +inf, -inf, finite."""
    if mode is None:
        return None
    sink = math.log(topk) + 1.5 * torch.randn((h_q,), generator=gen, device=DEVICE)
    if mode == "inf":
        sink[1::4] = INF
        sink[2::4] = -INF
    elif mode != "finite":
        raise ValueError(mode)
    return sink.float()


def make_q(b, s_q, h_q, d, layout, gen) -> torch.Tensor:
    data = torch.randn((b, s_q, h_q, d), generator=gen, device=DEVICE).to(BF16)
    if layout == "contiguous":
        return data
    if layout == "head_pad":  # a head slice of a wider NaN tensor
        q = torch.full((b, s_q, h_q + 3, d), NAN, dtype=BF16, device=DEVICE)[:, :, 1:h_q + 1]
    elif layout == "bhsd":  # stored (b, h_q, s_q, d)
        q = torch.empty((b, h_q, s_q, d), dtype=BF16, device=DEVICE).transpose(1, 2)
    else:
        raise ValueError(layout)
    q.copy_(data)
    return q


def num_blocks_for(b, s_q, topk, page) -> int:
    """Enough blocks that about half the slots stay unselected (and so poisoned)."""
    return max(1, -(-max(64, b * s_q * topk) // page))


def selected_slots(capacity: int, page: int, indices: torch.Tensor,
                   lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """(capacity // page, page) bool: slots some valid index within its row's length selects."""
    topk = indices.shape[-1]
    pos = torch.arange(topk, device=indices.device)
    n = (torch.full((indices.shape[0],), topk, device=indices.device) if lengths is None
         else lengths.long().clamp(0, topk))
    idx = indices.long()
    live = (pos[None, None, :] < n[:, None, None]) & (idx >= 0) & (idx < capacity)
    sel = torch.zeros(capacity, dtype=torch.bool, device=indices.device)
    sel[idx[live]] = True
    return sel.view(capacity // page, page)


def _cache_for(fmt, b, s_q, topk, page, gen, *, pad, byte_dtype):
    nb = num_blocks_for(b, s_q, topk, page)
    return build_cache(fmt, random_values(fmt, nb, page, gen), pad=pad, byte_dtype=byte_dtype)


def build_problem(spec: Spec, seed: int) -> Problem:
    """A random problem of ``spec`` (same shapes for every seed), unselected slots poisoned."""
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed)
    rng = random.Random(seed)
    d = D_QK[spec.fmt]
    b, s_q = spec.b, spec.s_q
    q = make_q(b, s_q, spec.h_q, d, spec.q_layout, gen)
    main = _cache_for(spec.fmt, b, s_q, spec.topk, spec.page, gen, pad=spec.pad, byte_dtype=spec.byte_dtype)
    indices = make_indices(b, s_q, spec.topk, main.capacity, spec.page, gen, invalid=spec.invalid,
                           edges=spec.invalid < 1)
    topk_length = make_lengths(spec.lengths, b, spec.topk, rng)
    extra = extra_indices = extra_topk_length = None
    if spec.extra is not None:
        e_page, e_topk, e_lengths = spec.extra
        # The other padding than the main cache's.
        extra = _cache_for(spec.fmt, b, s_q, e_topk, e_page, gen, pad=not spec.pad, byte_dtype=spec.byte_dtype)
        extra_indices = make_indices(b, s_q, e_topk, extra.capacity, e_page, gen, invalid=spec.invalid,
                                     edges=spec.invalid < 1)
        extra_topk_length = make_lengths(e_lengths, b, e_topk, rng)
    if spec.empty_row and b * s_q > 1:
        pool = junk_pool(main.capacity, spec.page)
        indices[-1, -1] = torch.tensor([pool[j % len(pool)] for j in range(spec.topk)], device=DEVICE)
        if extra is not None:
            pool = junk_pool(extra.capacity, extra.page)
            extra_indices[-1, -1] = torch.tensor([pool[-1 - j % len(pool)] for j in range(extra_indices.shape[-1])],
                                                 device=DEVICE)
    poison_unselected(main, selected_slots(main.capacity, main.page, indices, topk_length), gen)
    if extra is not None:
        poison_unselected(extra, selected_slots(extra.capacity, extra.page, extra_indices, extra_topk_length), gen)
    sink = make_sink(spec.sink, spec.h_q, spec.topk, gen)
    return Problem(spec, q, main, indices, topk_length, extra, extra_indices, extra_topk_length, sink,
                   spec.scale_mult / math.sqrt(d))


def repoison(p: Problem, seed: int) -> None:
    """After p's indices, lengths or cache values changed in place: both caches rewritten, every
    slot the current indices and lengths do not select poisoned."""
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed)
    rewrite_cache(p.main, selected_slots(p.main.capacity, p.main.page, p.indices, p.topk_length), gen)
    if p.extra is not None:
        rewrite_cache(p.extra, selected_slots(p.extra.capacity, p.extra.page, p.extra_indices,
                                              p.extra_topk_length), gen)


def decode(p: Problem, sched, kernel: str = "auto", **kwargs):
    """The token-sparse call, every argument positional in later FlashMLA's order."""
    return flash_mla_with_kvcache(p.q, p.main.k, None, None, DV, sched, None, p.softmax_scale, False, p.fp8,
                                  p.indices, p.sink, p.extra.k if p.extra is not None else None, p.extra_indices,
                                  p.topk_length, p.extra_topk_length, kernel=kernel, **kwargs)


@contextlib.contextmanager
def _full_fp32_matmul():
    """The reference's float32 matmuls in full float32 (no TF32), whatever the global setting."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def reference(p: Problem):
    """sparse_decode_reference (float32) on the dequantized current contents of the caches."""
    with _full_fp32_matmul():
        out, lse = sparse_decode_reference(
            p.q, p.main.dequantized(), p.indices, topk_length=p.topk_length, attn_sink=p.sink,
            extra_kv=p.extra.dequantized() if p.extra is not None else None, extra_indices=p.extra_indices,
            extra_topk_length=p.extra_topk_length, softmax_scale=p.softmax_scale, head_dim_v=DV)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "the reference read a poisoned slot"
    return out, lse


def check(out, lse, ref, what: str) -> None:
    assert_decode_matches(out, lse, ref[0], ref[1], BF16, what=what)


def nan_outputs(p: Problem):
    """NaN-filled out / lse buffers with one batch entry on each side ([1:-1] are the outputs)."""
    out_buf = torch.full((p.b + 2, p.s_q, p.h_q, DV), NAN, dtype=BF16, device=DEVICE)
    lse_buf = torch.full((p.b + 2, p.h_q, p.s_q), NAN, dtype=torch.float32, device=DEVICE)
    return out_buf, lse_buf


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A NaN-safe integer view for equality of inputs (any one-, two- or four-byte dtype)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _snapshot(p: Problem):
    tensors = [p.q, p.main.raw, p.indices, p.topk_length, p.sink]
    if p.extra is not None:
        tensors += [p.extra.raw, p.extra_indices, p.extra_topk_length]
    return [None if t is None else _bytes_of(t).clone() for t in tensors]


def _assert_inputs_unchanged(p: Problem, before, what: str) -> None:
    for i, (old, new) in enumerate(zip(before, _snapshot(p))):
        assert (old is None) == (new is None)
        if old is not None:
            assert torch.equal(old, new), f"[{what}] input {i} was modified by the call"


def check_all_kernels(p: Problem, ref, label: str = "") -> dict:
    """Every kernel that runs ``p``'s format: allocated outputs against the reference, then into
    NaN-filled out= / lse= with the same scheduler object (same bits, neighbours untouched);
    inputs unchanged. Returns {kernel: (out, lse)}."""
    results = {}
    before = _snapshot(p)
    for kernel in sparse_kernels(p.spec.fmt):
        what = f"{label}{kernel} {p.describe()}"
        sched, none = get_mla_metadata()
        assert none is None
        out, lse = decode(p, sched, kernel)
        check(out, lse, ref, what)
        out_buf, lse_buf = nan_outputs(p)
        o2, l2 = decode(p, sched, kernel, out=out_buf[1:-1], lse=lse_buf[1:-1])
        torch.cuda.synchronize()
        assert torch.isnan(out_buf[0].float()).all() and torch.isnan(out_buf[-1].float()).all(), \
            f"[{what}] out= neighbours written"
        assert torch.isnan(lse_buf[0]).all() and torch.isnan(lse_buf[-1]).all(), f"[{what}] lse= neighbours written"
        assert_bitwise_equal(out_buf[1:-1], out, f"{what}: out= buffer vs allocated")
        assert_bitwise_equal(lse_buf[1:-1], lse, f"{what}: lse= buffer vs allocated")
        assert_bitwise_equal(o2, out, f"{what}: returned out vs allocated")
        assert_bitwise_equal(l2, lse, f"{what}: returned lse vs allocated")
        _assert_inputs_unchanged(p, before, what)
        results[kernel] = (out, lse)
    return results


# ----------------------------------------------------------------------------------------------
# the correctness matrix
# ----------------------------------------------------------------------------------------------

MATRIX = [
    Spec("bf16_576-topk64-page64-h128", "bf16_576", 3, 1, 128, 64, 64),
    Spec("bf16_576-topk7-page1-h3-sq4", "bf16_576", 2, 4, 3, 7, 1, lengths="mixed", sink="finite"),
    Spec("bf16_576-topk2048-page576-h16-sq2-pad", "bf16_576", 2, 2, 16, 2048, 576, pad=True, sink="inf",
         q_layout="head_pad"),
    Spec("bf16_576-topk100-page69-h1-sq2-extra61", "bf16_576", 4, 2, 1, 100, 69, lengths="mixed",
         extra=(61, 64, "mixed")),
    Spec("bf16_512-topk64-page2-h33-sq2", "bf16_512", 3, 2, 33, 64, 2, lengths="mixed", q_layout="bhsd"),
    Spec("bf16_512-topk1-page256-h64-sq4", "bf16_512", 4, 4, 64, 1, 256, sink="inf"),
    Spec("bf16_512-topk2048-page61-h128-pad-extra2", "bf16_512", 2, 1, 128, 2048, 61, pad=True, sink="finite",
         extra=(2, 7, None)),
    Spec("v32-topk2048-page64-h64", "v32", 4, 1, 64, 2048, 64, lengths="mixed", sink="inf"),
    Spec("v32-topk64-page61-h16-sq2-int8-pad", "v32", 3, 2, 16, 64, 61, pad=True, byte_dtype=torch.int8,
         scale_mult=0.5),
    Spec("v32-topk100-page576-h3-sq4-fp8bytes-extra69", "v32", 2, 4, 3, 100, 576, byte_dtype=FP8, lengths="full",
         sink="finite", extra=(69, 100, "mixed")),
    Spec("v32-topk7-page2-h128-sq2-pad", "v32", 5, 2, 128, 7, 2, pad=True, lengths="mixed"),
    Spec("v32-topk1-page1-h33-extra256", "v32", 6, 1, 33, 1, 1, sink="inf", extra=(256, 1, None)),
    Spec("v32-topk16384-page64-h128", "v32", 1, 1, 128, 16384, 64, sink="finite"),
    Spec("model1-topk2048-page64-h128-sq2-extra576", "model1", 2, 2, 128, 2048, 64, lengths="mixed", sink="inf",
         extra=(576, 64, "mixed")),
    Spec("model1-topk64-page69-h1-int8-pad", "model1", 4, 1, 1, 64, 69, pad=True, byte_dtype=torch.int8,
         sink="finite"),
    Spec("model1-topk100-page256-h16-sq4", "model1", 2, 4, 16, 100, 256, q_layout="head_pad", scale_mult=2.0),
    Spec("model1-topk7-page61-h3-sq2-fp8bytes-extra1", "model1", 3, 2, 3, 7, 61, byte_dtype=FP8, lengths="mixed",
         extra=(1, 7, "mixed")),
    Spec("model1-topk1-page2-h64-sq2-pad", "model1", 4, 2, 64, 1, 2, pad=True, lengths="mixed"),
]


@pytest.mark.parametrize("spec", MATRIX, ids=[s.name for s in MATRIX])
def test_sparse_matches_reference(spec, seed):
    """Every kernel against the reference: invalid, duplicated and edge indices, a
    row with no valid key, poisoned unselected slots and padding, the spec's lengths, sinks,
    second cache and q layout; out= / lse= into NaN buffers; inputs left unchanged."""
    p = build_problem(spec, seed)
    assert p.q.shape == (spec.b, spec.s_q, spec.h_q, D_QK[spec.fmt]) and p.q.stride(-1) == 1
    ref = reference(p)
    if spec.empty_row and spec.b * spec.s_q > 1:
        assert (ref[1][-1, :, -1] == INF).all(), "the empty row of the problem has a key"
    check_all_kernels(p, ref)


# ----------------------------------------------------------------------------------------------
# the index rules, one by one
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(D_QK))
def test_sparse_no_valid_key_anywhere(fmt, seed):
    """Calls where no row has a valid key: every index invalid (both caches, sinks given), or
    valid indices cut off by topk_length 0 / extra_topk_length 0: out exactly 0 (over NaN-filled
    out=), lse +inf, whatever the sink."""
    spec = Spec(f"{fmt}-all-invalid", fmt, 3, 2, 16, 64, 61, invalid=1.0, sink="inf", extra=(2, 7, None))
    cut = Spec(f"{fmt}-zero-lengths", fmt, 3, 2, 16, 64, 61, invalid=0.0, lengths="zeros", sink="finite",
               extra=(64, 7, "zeros"), empty_row=False)
    for s in (spec, cut):
        p = build_problem(s, seed)
        ref = reference(p)
        assert (ref[1] == INF).all() and (ref[0] == 0).all()
        for kernel in sparse_kernels(fmt):
            what = f"{kernel} {p.describe()}"
            sched, _ = get_mla_metadata()
            out_buf, lse_buf = nan_outputs(p)
            out, lse = decode(p, sched, kernel, out=out_buf[1:-1], lse=lse_buf[1:-1])
            torch.cuda.synchronize()
            assert (out_buf[1:-1] == 0).all(), f"[{what}] out is not 0 everywhere"
            assert (lse_buf[1:-1] == INF).all(), f"[{what}] lse is not +inf everywhere"
            assert (out == 0).all() and (lse == INF).all(), what
            check(out, lse, ref, what)


@pytest.mark.parametrize("scales", [(1.0, 1.0 / 3.0, 1.2345e-3, 300.0), (2.0 ** -10, 255.5, 7.0, 0.999)],
                         ids=["third-tiny-300", "pow2-255-7-0.999"])
def test_sparse_v32_widening_every_byte_and_scale(scales, seed):
    """The V3.2 widening, value by value: with one selected key, out is that key's V, so each of
    the 512 outputs is one widened e4m3 byte times its group's scale. Every finite e4m3 byte
    meets every scale (4 query tokens, each selecting a token whose 4 group scales are rotated):
    powers of two (exact), arbitrary ones (1/3, 1.2345e-3, 0.999) and large ones (255.5, 300):
    each within bf16 rounding of the float64 product."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    codes = torch.arange(256, dtype=torch.int32)
    finite = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # 254 bytes
    nope = torch.cat([finite, finite[:2], finite, finite[:2]])  # 512 channels, every byte in each half
    value = nope.view(FP8).to(torch.float64)
    page, s_q, h_q = 64, 4, 64
    raw = torch.full((1, page, ROW_BYTES["v32"]), 0x7F, dtype=torch.uint8)  # NaN poison elsewhere
    expected = torch.empty((s_q, DV), dtype=torch.float64)
    for t in range(s_q):
        group_scale = torch.tensor([scales[(g + t) % 4] for g in range(4)], dtype=torch.float32)
        raw[0, t, :512] = nope
        raw[0, t, 512:528] = group_scale.view(torch.uint8)
        raw[0, t, 528:] = (torch.randn(64) * 0.1).to(BF16).view(torch.uint8)
        expected[t] = value * group_scale.to(torch.float64).repeat_interleave(128)
    cache = raw.to(DEVICE).view(1, page, 1, ROW_BYTES["v32"]).view(FP8)
    q = (torch.randn((1, s_q, h_q, 576), generator=gen, device=DEVICE) * 0.1).to(BF16)
    indices = torch.arange(s_q, dtype=torch.int32, device=DEVICE).view(1, s_q, 1)
    want = expected.to(DEVICE)
    ulp_bound = 2.0 ** -8 * (1 + 2.0 ** -14)  # bf16 round-to-nearest (8 significant bits) after a float32 product
    for kernel in sparse_kernels("v32"):
        sched, _ = get_mla_metadata()
        out, lse = flash_mla_with_kvcache(q, cache, None, None, DV, sched, None, None, False, True, indices,
                                          kernel=kernel)
        got = out[0, :s_q].to(torch.float64)  # (s_q, h_q, 512): every head the same V
        err = (got - want[:, None, :]).abs()
        bound = want.abs()[:, None, :] * ulp_bound
        worst = (err - bound).max().item()
        assert worst <= 0, f"[{kernel}] widened values off by more than bf16 rounding (excess {worst:.3e})"
        assert torch.isfinite(lse).all(), f"[{kernel}] lse not finite"


@pytest.mark.parametrize("fmt", ["bf16_576", "model1"])
def test_sparse_negative_and_too_large_indices_are_skipped(fmt, seed):
    """Half the entries of every row invalid (each junk value in turn: -1, -page, INT_MIN, the
    capacity, INT_MAX, ...), the other half valid: the same result, within rounding, as the
    valid entries alone; and the junk slots around the cache (the last page's last token, page
    0) poisoned where not selected."""
    spec = Spec(f"{fmt}-junk", fmt, 2, 2, 16, 64, 64, invalid=0.0, empty_row=False)
    p = build_problem(spec, seed)
    pool = torch.tensor(junk_pool(p.main.capacity, spec.page), dtype=torch.int32, device=DEVICE)
    junk = pool[torch.arange(32, device=DEVICE) % pool.numel()]
    # valid entries 0..31, junk 32..63: then the junk interleaved with the valid entries
    p.indices[..., 32:] = junk
    repoison(p, seed + 1)
    compact = dataclasses.replace(p, indices=p.indices[..., :32].contiguous())
    ref = reference(compact)
    check_all_kernels(compact, ref, label="valid only ")
    check_all_kernels(p, ref, label="junk after ")
    perm = torch.randperm(64, generator=torch.Generator(device=DEVICE).manual_seed(seed + 1), device=DEVICE)
    shuffled = dataclasses.replace(p, indices=p.indices[..., perm].contiguous())
    check_all_kernels(shuffled, ref, label="junk interleaved ")


@pytest.mark.parametrize("fmt", ["bf16_512", "v32"])
def test_sparse_duplicates_count_as_often_as_they_appear(fmt, seed):
    """Every token twice (shuffled), one row of 64 copies of one token, one of 2 tokens 63:1:
    duplicates are keys as many times as they appear (not merged)."""
    spec = Spec(f"{fmt}-dups", fmt, 2, 2, 16, 64, 69, invalid=0.0, empty_row=False)
    p = build_problem(spec, seed)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 7)
    half = p.indices[..., :32]
    both = torch.cat([half, half], dim=-1)
    perm = torch.randperm(64, generator=gen, device=DEVICE)
    p.indices.copy_(both[..., perm])
    token = int(p.indices[0, 0, 0])
    p.indices[0, 0] = token
    row = p.indices[1, 1].tolist()
    other = next(t for t in row if t != row[5])
    p.indices[1, 1] = row[5]
    p.indices[1, 1, 17] = other
    repoison(p, seed + 1)
    ref = reference(p)
    results = check_all_kernels(p, ref)
    # 64 copies of one key: out is that key's V (exact in bf16 for the bf16 cache, within
    # rounding otherwise) and lse its score + log(64).
    key = p.main.dequantized().reshape(-1, D_QK[fmt])[token]
    with _full_fp32_matmul():
        score = (p.q[0, 0].float() @ key) * p.softmax_scale  # (h_q,)
    for kernel, (out, lse) in results.items():
        torch.testing.assert_close(out[0, 0].float(), key[:DV].expand(p.h_q, DV), rtol=1e-2, atol=1e-2,
                                   msg=lambda m: f"{kernel}, 64 copies of one key: {m}")
        torch.testing.assert_close(lse[0, :, 0], score + math.log(64), rtol=0, atol=2e-3,
                                   msg=lambda m: f"{kernel}, 64 copies of one key: {m}")


@pytest.mark.parametrize("fmt", ["bf16_576", "model1"])
def test_sparse_topk_length_out_of_range_is_clamped(fmt, seed):
    """topk_length values beyond 0..topk (topk + 5, INT_MAX, -3, INT_MIN) act as topk and 0;
    entries past a request's length are never read (poisoned)."""
    spec = Spec(f"{fmt}-clamp", fmt, 4, 2, 16, 64, 64, lengths="full", extra=(61, 7, "full"), empty_row=False)
    p = build_problem(spec, seed)
    p.topk_length.copy_(torch.tensor([64 + 5, INT_MAX, -3, INT_MIN], dtype=torch.int32))
    p.extra_topk_length.copy_(torch.tensor([-1, 7 + 1, INT_MIN, INT_MAX], dtype=torch.int32))
    repoison(p, seed + 3)
    ref = reference(p)
    assert (ref[1][2] == INF).all(), "request 2 should have no key"
    check_all_kernels(p, ref)


@pytest.mark.parametrize("fmt", ["bf16_576", "v32", "model1"])
def test_sparse_topk_length_every_value(fmt, seed):
    """Request i of 66 uses the first i - 1 entries (-1, 0, 1, ..., 64): every length of a 64-wide
    row, the entries past it poisoned where nothing else selects them."""
    b, topk = 66, 64
    spec = Spec(f"{fmt}-every-length", fmt, b, 1, 3, topk, 64, lengths="full", invalid=0.1, empty_row=False)
    p = build_problem(spec, seed)
    p.topk_length.copy_(torch.arange(-1, b - 1, dtype=torch.int32))
    repoison(p, seed + 5)
    check_all_kernels(p, reference(p))


@pytest.mark.parametrize("fmt", ["bf16_576", "v32", "model1"])
def test_sparse_attention_sinks(fmt, seed):
    """Sinks +inf (out exactly 0, lse finite), -inf (no effect), 0, +-1e4 and values in the
    lse's range; lse returned without the sink (same as the call without one)."""
    spec = Spec(f"{fmt}-sinks", fmt, 3, 2, 8, 100, 61, lengths="mixed", extra=(2, 7, None))
    p = build_problem(spec, seed)
    sink = torch.tensor([INF, -INF, 0.0, 1e4, -1e4, math.log(100), math.log(100) + 2, math.log(100) - 2],
                        dtype=torch.float32, device=DEVICE)
    with_sink = dataclasses.replace(p, sink=sink)
    ref = reference(with_sink)
    ref_plain = reference(p)
    results = check_all_kernels(with_sink, ref)
    for kernel, (out, lse) in results.items():
        out0, lse0 = decode(p, get_mla_metadata()[0], kernel)
        check(out0, lse0, ref_plain, f"{kernel} no sink")
        assert torch.allclose(lse, lse0, rtol=0, atol=1e-4), f"{kernel}: lse depends on the sink"
        assert (out[:, :, 0] == 0).all() and (out[:, :, 3] == 0).all(), f"{kernel}: +inf / 1e4 sink, out != 0"
        assert torch.isfinite(lse[:, 0]).equal(torch.isfinite(lse0[:, 0])), f"{kernel}: lse with a +inf sink"
        torch.testing.assert_close(out[:, :, 1].float(), out0[:, :, 1].float(), rtol=1e-2, atol=1e-2,
                                   msg=lambda m: f"{kernel}: -inf sink changed out: {m}")


# ----------------------------------------------------------------------------------------------
# the second cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(D_QK))
def test_sparse_extra_cache_alone_together_and_empty(fmt, seed):
    """Main cache (page 69) and second cache (page 2, its own indices): the main cache cut to 0
    (keys from the second alone), the second cut to 0 (as if absent: same as the call without
    it), both in use; the two caches swapped."""
    spec = Spec(f"{fmt}-two-caches", fmt, 3, 2, 16, 64, 69, lengths="full", sink="finite", extra=(2, 100, "full"))
    p = build_problem(spec, seed)
    full = reference(p)
    check_all_kernels(p, full, label="both ")

    main_cut = dataclasses.replace(p, topk_length=torch.zeros_like(p.topk_length))
    ref_cut = reference(main_cut)
    assert torch.isfinite(ref_cut[1][0]).all(), "request 0 should see extra keys only"
    check_all_kernels(main_cut, ref_cut, label="main cut to 0 ")

    extra_cut = dataclasses.replace(p, extra_topk_length=torch.zeros_like(p.extra_topk_length))
    no_extra = dataclasses.replace(p, extra=None, extra_indices=None, extra_topk_length=None)
    ref_main = reference(no_extra)
    with_cut = check_all_kernels(extra_cut, ref_main, label="extra cut to 0 ")
    without = check_all_kernels(no_extra, ref_main, label="no extra ")
    for kernel in with_cut:
        torch.testing.assert_close(with_cut[kernel][0].float(), without[kernel][0].float(), rtol=2e-2, atol=2e-2)

    swapped = dataclasses.replace(p, main=p.extra, indices=p.extra_indices, topk_length=p.extra_topk_length,
                                  extra=p.main, extra_indices=p.indices, extra_topk_length=p.topk_length)
    check_all_kernels(swapped, reference(swapped), label="swapped ")


# ----------------------------------------------------------------------------------------------
# cache layouts: byte dtype and padding change no bit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(D_QK))
def test_sparse_byte_dtype_and_page_padding_change_nothing(fmt, seed):
    """The same values as uint8 / int8 / float8_e4m3fn bytes and with padded or unpadded page
    strides (other poison bytes, too): bit-identical results, and equal to the reference."""
    spec = Spec(f"{fmt}-layouts", fmt, 3, 2, 16, 100, 61, lengths="mixed", sink="finite", extra=(69, 7, None))
    p = build_problem(spec, seed)
    variants = [(torch.uint8, True), (torch.int8, False), (FP8, True)] if fmt in FP8_FORMATS else [(BF16, True)]
    assert not spec.pad
    sel_main = selected_slots(p.main.capacity, p.main.page, p.indices, p.topk_length)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 11)
    base = check_all_kernels(p, reference(p), label="base ")
    for dtype, pad in variants:
        main = build_cache(fmt, p.main.values, pad=pad, byte_dtype=dtype if fmt in FP8_FORMATS else torch.uint8)
        poison_unselected(main, sel_main, gen)
        q = make_q(p.b, p.s_q, p.h_q, D_QK[fmt], "bhsd", gen)
        q.copy_(p.q)
        v = dataclasses.replace(p, main=main, q=q)
        assert (v.main.k.stride(0) != p.main.k.stride(0)) == pad and v.main.k.dtype == (dtype if v.fp8 else BF16)
        got = check_all_kernels(v, reference(v), label=f"{dtype} pad={pad} ")
        for kernel in got:
            assert_bitwise_equal(got[kernel][0], base[kernel][0], f"{kernel} {dtype} pad={pad} out")
            assert_bitwise_equal(got[kernel][1], base[kernel][1], f"{kernel} {dtype} pad={pad} lse")


# ----------------------------------------------------------------------------------------------
# kernel choice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bf16_512", "v32"])
def test_sparse_auto_runs_a_listed_kernel(fmt, seed):
    """kernel="auto" (the default) with indices runs one of the kernels that take the format
    (on Hopper, sm90 for V3.2): its bits are those of one of them; the default is "auto"."""
    spec = Spec(f"{fmt}-auto", fmt, 4, 2, 64, 2048, 64, lengths="mixed", sink="inf", extra=(61, 64, None))
    p = build_problem(spec, seed)
    ref = reference(p)
    out, lse = decode(p, get_mla_metadata()[0], "auto")
    check(out, lse, ref, f"auto {p.describe()}")
    default = flash_mla_with_kvcache(p.q, p.main.k, None, None, DV, get_mla_metadata()[0], None, p.softmax_scale,
                                     False, p.fp8, p.indices, p.sink, p.extra.k, p.extra_indices, p.topk_length,
                                     p.extra_topk_length)
    assert_bitwise_equal(default[0], out, "default kernel vs auto out")
    forced = {k: decode(p, get_mla_metadata()[0], k) for k in sparse_kernels(fmt)}
    same = [k for k, (o, l_) in forced.items()
            if torch.equal(_bytes_of(o), _bytes_of(out)) and torch.equal(_bytes_of(l_), _bytes_of(lse))]
    assert same, f"auto's result is none of the kernels' ({sorted(forced)})"


def test_sparse_sm90_kernel_refused(seed):
    """kernel="sm90" with a format it does not take: ValueError before any launch (out=
    untouched)."""
    p = build_problem(Spec("model1-sm90", "model1", 2, 1, 16, 64, 64), seed)
    out_buf, lse_buf = nan_outputs(p)
    with pytest.raises(ValueError, match=r"sm90|kernel"):
        decode(p, get_mla_metadata()[0], "sm90", out=out_buf[1:-1], lse=lse_buf[1:-1])
    torch.cuda.synchronize()
    assert torch.isnan(out_buf.float()).all() and torch.isnan(lse_buf).all(), "a refused call wrote out / lse"


# ----------------------------------------------------------------------------------------------
# the bounds are tight enough
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bf16_576", "v32"])
def test_checker_catches_one_missing_key(fmt, seed):
    """The comparison used everywhere here fails a result that lacks one key of 64 in one row:
    the key of least weight (over all heads) of row (0, 0) replaced by -1, or cut off by a
    topk_length one short."""
    spec = Spec(f"{fmt}-missing-key", fmt, 2, 1, 16, 64, 64, invalid=0.0, lengths="full", empty_row=False)
    p = build_problem(spec, seed)
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed + 1)
    p.indices.copy_(torch.stack([torch.randperm(p.main.capacity, generator=gen, device=DEVICE)[:64]
                                 for _ in range(2)]).view(2, 1, 64))  # 64 distinct valid keys a row
    repoison(p, seed + 2)
    deq = p.main.dequantized().reshape(-1, D_QK[fmt])
    ref = reference(p)
    keys = deq[p.indices[0, 0].long()]
    with _full_fp32_matmul():
        probs = torch.softmax((p.q[0, 0].float() @ keys.t()) * p.softmax_scale, dim=-1)  # (h_q, 64)
    weakest = int(probs.max(dim=0).values.argmin())
    last = dataclasses.replace(p, indices=p.indices.clone())
    last.indices[0, 0, [weakest, 63]] = last.indices[0, 0, [63, weakest]]  # weakest key last
    dropped = dataclasses.replace(p, indices=p.indices.clone())
    dropped.indices[0, 0, weakest] = -1
    short = dataclasses.replace(last, topk_length=torch.tensor([63, 64], dtype=torch.int32, device=DEVICE))
    for kernel in sparse_kernels(fmt):
        out, lse = decode(last, get_mla_metadata()[0], kernel)
        check(out, lse, ref, f"{kernel} all keys")
        for name, bad in (("dropped", dropped), ("topk_length 63", short)):
            out, lse = decode(bad, get_mla_metadata()[0], kernel)
            with pytest.raises(AssertionError):
                check(out, lse, ref, f"{kernel} {name}")


# ----------------------------------------------------------------------------------------------
# determinism, CUDA graphs, the scheduler object
# ----------------------------------------------------------------------------------------------

BIG = Spec("v32-determinism", "v32", 4, 2, 128, 2048, 64, lengths="mixed", sink="inf", extra=(69, 64, "mixed"))


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_sparse_repeated_calls_bitwise_identical(kernel, seed):
    skip_unless_runs(kernel, BIG.fmt)
    p = build_problem(BIG, seed)
    sched, _ = get_mla_metadata()
    first_out, first_lse = decode(p, sched, kernel)
    check(first_out, first_lse, reference(p), f"{kernel} {p.describe()}")
    out_buf, lse_buf = torch.empty_like(first_out), torch.empty((p.b, p.h_q, p.s_q), device=DEVICE)
    for i in range(2):
        out, lse = decode(p, sched, kernel)
        assert_bitwise_equal(out, first_out, f"{kernel} out, call {i}")
        assert_bitwise_equal(lse, first_lse, f"{kernel} lse, call {i}")
        decode(p, sched, kernel, out=out_buf, lse=lse_buf)
        assert_bitwise_equal(out_buf, first_out, f"{kernel} out=, call {i}")
        assert_bitwise_equal(lse_buf, first_lse, f"{kernel} lse=, call {i}")
    out, lse = decode(p, get_mla_metadata()[0], kernel)
    assert_bitwise_equal(out, first_out, f"{kernel} out, new scheduler object")
    assert_bitwise_equal(lse, first_lse, f"{kernel} lse, new scheduler object")


GRAPH = Spec("model1-graph", "model1", 3, 2, 16, 100, 61, lengths="mixed", sink="inf", extra=(2, 7, "mixed"),
             pad=True)


GRAPH_V32 = dataclasses.replace(GRAPH, name="v32-graph", fmt="v32")


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_sparse_cuda_graph_replay(kernel, seed):
    """Capture one call (the scheduler object planned by the warm-up), then replay after
    changing, in place and with the same shapes: the indices, the caches' contents and q; then
    also topk_length, extra_topk_length and the sinks. Every replay gives the new problem's
    result, and the bits of an eager call."""
    spec = GRAPH_V32 if kernel == "sm90" else GRAPH
    skip_unless_runs(kernel, spec.fmt)
    p = build_problem(spec, seed)
    sched, _ = get_mla_metadata()
    graph, (out, lse) = capture_graph(lambda: decode(p, sched, kernel))
    for round_ in range(3):
        if round_:
            new = build_problem(spec, seed + 1000 * round_)
            p.q.copy_(new.q)
            p.indices.copy_(new.indices)
            p.extra_indices.copy_(new.extra_indices)
            p.main.values.copy_(new.main.values)
            p.extra.values.copy_(new.extra.values)
            if round_ == 2:
                p.topk_length.copy_(new.topk_length.flip(0))
                p.extra_topk_length.copy_(new.extra_topk_length.flip(0))
                p.sink.copy_(new.sink.flip(0))
            repoison(p, seed + round_)  # the caches' new contents, in place
        out.fill_(NAN)
        lse.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        what = f"{kernel} replay {round_} {p.describe()}"
        check(out, lse, reference(p), what)
        eager_out, eager_lse = decode(p, sched, kernel)
        assert_bitwise_equal(out, eager_out, f"{what}: graph vs eager out")
        assert_bitwise_equal(lse, eager_lse, f"{what}: graph vs eager lse")


LAYERS = Spec("layers", "model1", 3, 2, 16, 64, 61, lengths="mixed", sink="finite", extra=(64, 7, "mixed"))


def test_sparse_sched_reused_across_layers(seed):
    """One scheduler object for two layers (own caches, indices, q, sinks; same shapes), twice
    over: each layer matches its reference, a second step repeats the bits, and a fresh object
    gives the same bits."""
    layers = [build_problem(LAYERS, seed + i) for i in range(2)]
    sched, _ = get_mla_metadata()
    first = [decode(p, sched) for p in layers]
    for i, (p, (out, lse)) in enumerate(zip(layers, first)):
        check(out, lse, reference(p), f"layer {i} {p.describe()}")
    for i, p in enumerate(layers):
        out, lse = decode(p, sched)
        assert_bitwise_equal(out, first[i][0], f"layer {i} out, second step")
        assert_bitwise_equal(lse, first[i][1], f"layer {i} lse, second step")
        out, lse = decode(p, get_mla_metadata()[0])
        assert_bitwise_equal(out, first[i][0], f"layer {i} out, fresh scheduler object")
        assert_bitwise_equal(lse, first[i][1], f"layer {i} lse, fresh scheduler object")


SCHED_BASE = Spec("sched-base", "v32", 2, 2, 16, 64, 64, sink="finite")
SCHED_CHANGES = {
    "b": dict(b=3),
    "s_q": dict(s_q=1),
    "h_q": dict(h_q=32),
    "topk": dict(topk=128),
    "format_v32_to_model1": dict(fmt="model1"),
    "format_v32_to_bf16_576": dict(fmt="bf16_576"),
}


@pytest.mark.parametrize("change", list(SCHED_CHANGES), ids=list(SCHED_CHANGES))
def test_sparse_sched_refuses_another_configuration(change, seed):
    """A scheduler object planned by one call refuses a later call with another b, s_q, h_q,
    topk or format (ValueError, nothing written), and still serves its own configuration."""
    p = build_problem(SCHED_BASE, seed)
    other = build_problem(dataclasses.replace(SCHED_BASE, name=change, **SCHED_CHANGES[change]), seed + 1)
    sched, _ = get_mla_metadata()
    out, lse = decode(p, sched)
    out_buf, lse_buf = nan_outputs(other)
    with pytest.raises(ValueError):
        decode(other, sched, out=out_buf[1:-1], lse=lse_buf[1:-1])
    torch.cuda.synchronize()
    assert torch.isnan(out_buf.float()).all() and torch.isnan(lse_buf).all(), "a refused call wrote out / lse"
    again = decode(p, sched)
    assert_bitwise_equal(again[0], out, "out after the refused call")
    assert_bitwise_equal(again[1], lse, "lse after the refused call")
    check(*again, reference(p), "after the refused call")


def _dense_call(p: Problem, sched):
    """A dense decode with p's q (576 channels) on a small bf16 paged cache."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    k = torch.randn((4, 64, 1, 576), generator=gen, device=DEVICE).to(BF16)
    table = torch.arange(2 * p.b, device=DEVICE, dtype=torch.int32).view(p.b, 2) % 4
    lens = torch.full((p.b,), 70, dtype=torch.int32, device=DEVICE)
    return flash_mla_with_kvcache(p.q, k, table, lens, DV, sched, None, p.softmax_scale, False)


@pytest.mark.parametrize("order", ["dense_then_sparse", "sparse_then_dense"])
def test_sparse_sched_refuses_dense_and_sparse_mix(order, seed):
    """A scheduler object planned by dense decode refuses a token-sparse call of the same b,
    s_q, h_q, and the other way round (another format, no top-k against top-k)."""
    p = build_problem(dataclasses.replace(SCHED_BASE, fmt="bf16_576"), seed)
    sched, _ = get_mla_metadata()
    if order == "dense_then_sparse":
        _dense_call(p, sched)
        with pytest.raises(ValueError):
            decode(p, sched)
    else:
        decode(p, sched)
        with pytest.raises(ValueError):
            _dense_call(p, sched)
    torch.cuda.synchronize()
