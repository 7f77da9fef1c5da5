"""Shared pytest helpers of the flash-mla Python tests.

* ``requires_gpu`` marker: tests (or whole modules, via ``pytestmark``) marked with it are
  skipped cleanly when no CUDA GPU of compute capability 8.0 or newer is present.
* ``seed`` fixture: a stable per-test seed derived from the test's name (parameter ids
  included), so every parameter set gets its own fresh but reproducible random data.
* ``make_case`` fixture: ``build_paged_case(...)`` below, a random paged-KV decode problem
  with poisoned unused memory (NaN cache slots and pages, junk block-table tails, NaN query
  padding), any supported page size (``page=``, default 64) and optionally non-contiguous
  ``q`` / ``k_cache``.
* ``make_seqlens`` fixture: ``seqlens_for(...)``, length patterns with the edge values.
* ``check_decode`` fixture: ``assert_decode_matches(...)``, the comparison of a kernel result
  with the reference (tolerances documented there).
* Plain helpers the test modules import (``from conftest import ...``): ``cpu_decode_args``
  (well-formed decode arguments, all on the CPU), ``capture_graph`` (warm up, then capture a
  call in a CUDA graph) and ``quantize_case_fp8`` (a paged case turned into the dense FP8
  format: float8_e4m3fn cache, optionally q, with NaN codes in every unused byte), ``bits`` /
  ``assert_bitwise_equal`` (NaN-safe bitwise comparison of results), and ``ORDER`` / ``call``
  (``flash_mla_with_kvcache`` on a dict of arguments keyed by ORDER, as ``cpu_decode_args``
  returns).
* ``path`` fixture: runs a test on the direct eager path and again through the torch.library
  custom ops.

This file imports only torch: the compiled module is imported by the test modules themselves
(``quantize_case_fp8`` imports ``flash_mla.kv_formats``, plain torch, when called; ``call``
and the ``path`` fixture import ``flash_mla`` when they run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import random
import zlib
from typing import List, NamedTuple, Optional, Sequence, Union

import pytest
import torch

HEAD_DIM = 576
HEAD_DIM_V = 512
PAGE = 64  # the default page size (tokens per page, dim 1 of k_cache)
PAGE_SIZES = (16, 32, 64, 128, 256)  # every page size the kernels take

# ----------------------------------------------------------------------------------------------
# GPU marker
# ----------------------------------------------------------------------------------------------


def gpu_skip_reason() -> Optional[str]:
    """None when the GPU tests can run here, else why they are skipped."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability(0)
    if major < 8:
        return f"needs a GPU of compute capability >= 8.0, found {major}.{minor}"
    return None


requires_gpu = pytest.mark.requires_gpu


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_gpu: needs a CUDA GPU (sm_80 or newer); skipped without one")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_gpu") is not None:
        reason = gpu_skip_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def seed(request) -> int:
    """A stable seed per test and parameter set (crc32 of the test's name with its ids)."""
    return zlib.crc32(request.node.name.encode())


# ----------------------------------------------------------------------------------------------
# Sequence lengths
# ----------------------------------------------------------------------------------------------

# Lengths around page boundaries, plus a few ordinary ones.
EDGE_LENGTHS = (0, 1, 63, 64, 65, 127, 128, 129, 191, 500, 1000, 2047, 2049)
# Long lengths (>= 8192), none a multiple of 64.
LONG_LENGTHS = (8193, 8257, 9000, 10001)


def seqlens_for(pattern: Union[str, Sequence[int]], b: int, s_q: int, rng: random.Random) -> List[int]:
    """Lengths of a batch of ``b`` requests.

    ``pattern`` is an explicit list, or one of:
      ``"edge"``   the EDGE_LENGTHS in turn (0, 1, 63, 64, 65, ...), shuffled;
      ``"mixed"``  edge values and uniform lengths in 0..3000;
      ``"long"``   like "mixed" (up to 1500) with one request of >= 8192 tokens;
      ``"short"``  0 .. s_q + 2 (causal rows with no visible key), with a 0 and s_q - 1;
      ``"zeros"``  all 0;
      ``"normal:M"``  normal(M, M/2) clipped to [s_q, 2M] (the benchmark distribution).
    """
    if not isinstance(pattern, str):
        lens = [int(x) for x in pattern]
        assert len(lens) == b, f"{len(lens)} lengths for batch {b}"
        return lens
    if pattern == "edge":
        start = rng.randrange(len(EDGE_LENGTHS))
        lens = [EDGE_LENGTHS[(start + i) % len(EDGE_LENGTHS)] for i in range(b)]
        rng.shuffle(lens)
        return lens
    if pattern == "mixed":
        return [rng.choice(EDGE_LENGTHS) if rng.random() < 0.3 else rng.randint(0, 3000)
                for _ in range(b)]
    if pattern == "long":
        lens = [rng.choice(EDGE_LENGTHS[:9]) if rng.random() < 0.3 else rng.randint(0, 1500)
                for _ in range(b)]
        lens[rng.randrange(b)] = rng.choice(LONG_LENGTHS)
        return lens
    if pattern == "short":
        lens = [rng.randint(0, s_q + 2) for _ in range(b)]
        lens[0] = 0
        if b > 1:
            lens[1] = max(s_q - 1, 0)
        return lens
    if pattern == "zeros":
        return [0] * b
    if pattern.startswith("normal:"):
        mean = int(pattern.split(":", 1)[1])
        return [min(max(int(rng.gauss(mean, mean / 2)), s_q), 2 * mean) for _ in range(b)]
    raise ValueError(f"unknown length pattern {pattern!r}")


@pytest.fixture
def make_seqlens():
    return seqlens_for


class CaseShape(NamedTuple):
    """A named decode shape of the GPU matrices (page sizes, FP8): b, s_q, h_q, h_kv, causal and
    the q / k_cache layouts of build_paged_case."""
    name: str
    b: int
    s_q: int
    h_q: int
    h_kv: int
    causal: bool
    q_layout: str = "contiguous"
    k_layout: str = "contiguous"


def page_edge_lengths(page: int) -> List[int]:
    """Lengths at the edges of pages of ``page`` tokens and of the kernels' 64-token tiles:
    0, 1, page - 1, page, page + 1, 2 and 3 pages (page boundaries that are not tile
    boundaries when page < 64), 63, 64, 65, 192 (tile boundaries inside a page when
    page > 64), lengths that are multiples of neither, and several pages per request (up to
    1,499 tokens: 94 pages of 16)."""
    return sorted({0, 1, page - 1, page, page + 1, 2 * page, 3 * page, 3 * page + 1,
                   3 * page + page // 2 + 1, 63, 64, 65, 192, 1437, 1500 // page * page, 1499})


def page_lengths(page: int, b: int, rng: random.Random) -> List[int]:
    """``b`` lengths drawn from ``page_edge_lengths(page)`` (cycling from a random start, then
    shuffled), one of them at least 1,437 tokens long."""
    edge = page_edge_lengths(page)
    start = rng.randrange(len(edge))
    lens = [edge[(start + i) % len(edge)] for i in range(b)]
    if max(lens) < 1437:
        lens[rng.randrange(b)] = rng.choice((1437, 1499))
    rng.shuffle(lens)
    return lens


# ----------------------------------------------------------------------------------------------
# Paged cases
# ----------------------------------------------------------------------------------------------

Q_LAYOUTS = ("contiguous", "head_pad", "bhsd", "hsbd")
K_LAYOUTS = ("contiguous", "head_pad", "row_pad", "page_pad")


def pages_of(seqlen: int, page: int = PAGE) -> int:
    return -(-seqlen // page) if seqlen > 0 else 0


@dataclasses.dataclass
class PagedCase:
    """One decode problem. ``q`` and ``k_cache`` may be views into larger poisoned buffers."""

    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    seqlens: List[int]
    valid: torch.Tensor  # (num_blocks, page) bool: slots holding real tokens
    dtype: torch.dtype
    q_layout: str
    k_layout: str
    q_scale: float
    k_scale: float

    @property
    def b(self) -> int:
        return self.q.shape[0]

    @property
    def s_q(self) -> int:
        return self.q.shape[1]

    @property
    def h_q(self) -> int:
        return self.q.shape[2]

    @property
    def h_kv(self) -> int:
        return self.k_cache.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[0]

    @property
    def page(self) -> int:
        """Tokens per page (dim 1 of k_cache)."""
        return self.k_cache.shape[1]

    @property
    def rows_per_kv_head(self) -> int:
        """The ``num_heads_per_head_k`` argument of get_mla_metadata: s_q * h_q // h_kv."""
        return self.s_q * self.h_q // self.h_kv

    def with_new_data(self, seed: int) -> "PagedCase":
        """Same lengths, block table, layouts and poison; fresh q and cache contents
        (another "layer" of the same decoding step)."""
        gen = _generator(self.q.device, seed)
        q = _make_q(self.b, self.s_q, self.h_q, self.dtype, self.q_layout, self.q_scale, gen,
                    self.q.device)
        k = _make_k(self.valid, self.h_kv, self.dtype, self.k_layout, self.k_scale, gen,
                    self.q.device)
        return dataclasses.replace(self, q=q, k_cache=k)

    def describe(self) -> str:
        page = f" page={self.page}" if self.page != PAGE else ""
        return (f"b={self.b} s_q={self.s_q} h_q={self.h_q} h_kv={self.h_kv} dtype={self.dtype}{page} "
                f"q={self.q_layout} k={self.k_layout} seqlens={_short_list(self.seqlens)}")


def _short_list(xs: Sequence[int], n: int = 16) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= n else f"{xs[:n]}... ({len(xs)} total)"


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _make_q(b, s_q, h_q, dtype, layout, scale, gen, device) -> torch.Tensor:
    """(b, s_q, h_q, 576) query in the given memory layout (last dim always contiguous)."""
    nan = float("nan")
    if layout == "contiguous":
        base = torch.empty((b, s_q, h_q, HEAD_DIM), dtype=dtype, device=device)
        q = base
    elif layout == "head_pad":
        # A slice of a wider head dimension, with NaN heads on both sides and a storage offset.
        base = torch.full((b, s_q, h_q + 3, HEAD_DIM), nan, dtype=dtype, device=device)
        q = base[:, :, 1:h_q + 1]
    elif layout == "bhsd":
        # Stored (b, h_q, s_q, d), seen as (b, s_q, h_q, d).
        base = torch.empty((b, h_q, s_q, HEAD_DIM), dtype=dtype, device=device)
        q = base.transpose(1, 2)
    elif layout == "hsbd":
        # Stored (h_q, s_q, b, d): batch stride 576, nothing contiguous but the last dim.
        base = torch.empty((h_q, s_q, b, HEAD_DIM), dtype=dtype, device=device)
        q = base.permute(2, 1, 0, 3)
    else:
        raise ValueError(f"unknown q layout {layout!r}")
    data = torch.randn((b, s_q, h_q, HEAD_DIM), generator=gen, device=device, dtype=torch.float32)
    q.copy_(data * scale)
    assert q.shape == (b, s_q, h_q, HEAD_DIM) and q.stride(-1) == 1
    return q


def _make_k(valid, h_kv, dtype, layout, scale, gen, device) -> torch.Tensor:
    """(num_blocks, page, h_kv, 576) cache (page = valid.shape[1]): random rows where
    ``valid``, NaN everywhere else (unused slots of last pages, unused pages, padding of the
    strided layouts)."""
    nan = float("nan")
    num_blocks, page = valid.shape
    if layout == "contiguous":
        k = torch.full((num_blocks, page, h_kv, HEAD_DIM), nan, dtype=dtype, device=device)
    elif layout == "head_pad":
        # A slice of a cache with more KV heads (other strides than the contiguous ones).
        base = torch.full((num_blocks, page, h_kv + 2, HEAD_DIM), nan, dtype=dtype, device=device)
        k = base[:, :, 1:h_kv + 1]
    elif layout == "row_pad":
        # Rows of 640 elements of which the middle 576 are used (16-byte aligned offsets).
        base = torch.full((num_blocks, page, h_kv, HEAD_DIM + 64), nan, dtype=dtype, device=device)
        k = base[..., 32:32 + HEAD_DIM]
    elif layout == "page_pad":
        # Pages further apart than page * h_kv * 576 elements: three NaN token rows between
        # consecutive pages (one before, two after), and a storage offset of one token row.
        base = torch.full((num_blocks, page + 3, h_kv, HEAD_DIM), nan, dtype=dtype, device=device)
        k = base[:, 1:page + 1]
    else:
        raise ValueError(f"unknown k_cache layout {layout!r}")
    data = torch.randn((num_blocks, page, h_kv, HEAD_DIM), generator=gen, device=device,
                       dtype=dtype)
    if scale != 1.0:
        data = data * scale
    data.masked_fill_(~valid.to(device)[:, :, None, None], nan)
    k.copy_(data)
    assert k.stride(-1) == 1
    return k


def _junk_entry(rng: random.Random, num_blocks: int) -> int:
    return rng.choice((
        -1,
        -(2 ** 31),
        2 ** 31 - 1,
        10 ** 9,
        num_blocks,
        num_blocks + 7,
        rng.randint(num_blocks, 2 ** 31 - 1),
        -rng.randint(1, 2 ** 31),
    ))


def build_paged_case(
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int,
    seqlens: Union[str, Sequence[int]],
    dtype: torch.dtype,
    *,
    seed: int,
    device: Union[str, torch.device] = "cuda",
    q_layout: str = "contiguous",
    k_layout: str = "contiguous",
    num_blocks: Optional[int] = None,
    table_width: Optional[int] = None,
    q_scale: float = 1.0,
    k_scale: float = 1.0,
    page: int = PAGE,
) -> PagedCase:
    """A random paged decode problem with poisoned unused memory.

    * ``seqlens``: explicit lengths or a pattern of ``seqlens_for``.
    * ``page``: tokens per page (dim 1 of ``k_cache``), 64 by default; token j of request i is
      ``k_cache[block_table[i, j // page], j % page]``.
    * The cache has more pages than needed (``num_blocks``, default needed + max(3, needed/8));
      each request's logical pages map to a random permutation of physical pages.
    * Every cache slot not holding one of the first L tokens of a request is NaN: the tail of
      each last page, every unused page, and the padding of the strided ``k_layout``s.
    * ``block_table`` (int32) has at least one extra column (``table_width``); every entry past
      a request's ceil(L/page) pages is junk: -1, INT32_MIN/MAX, 10**9, num_blocks, random.
    * ``q`` uses ``q_layout`` (see Q_LAYOUTS; "head_pad" surrounds it with NaN heads).
    * Data are randn * scale: with the default scale 1/sqrt(576) the scores are ~N(0, 1), so
      the softmax is neither one-hot nor flat.
    """
    assert h_kv >= 1 and h_q % h_kv == 0, (h_q, h_kv)
    assert page >= 1, page
    device = torch.device(device)
    rng = random.Random(seed)
    lens = seqlens_for(seqlens, b, s_q, rng)
    page_counts = [pages_of(L, page) for L in lens]
    needed = sum(page_counts)
    if num_blocks is None:
        num_blocks = needed + max(3, needed // 8)
    assert num_blocks >= needed, f"{num_blocks} pages for {needed} needed"
    min_width = max(page_counts + [0]) + 1
    width = table_width if table_width is not None else min_width + rng.randint(0, 2)
    assert width >= max(page_counts + [1]), f"table width {width} too small"

    physical = list(range(num_blocks))
    rng.shuffle(physical)
    table = []
    valid = torch.zeros((num_blocks, page), dtype=torch.bool)
    used = 0
    for L, n in zip(lens, page_counts):
        pages = physical[used:used + n]
        used += n
        table.append(pages + [_junk_entry(rng, num_blocks) for _ in range(width - n)])
        if n:
            valid[pages] = True
            if L % page:
                valid[pages[-1], L % page:] = False

    gen = _generator(device, seed)
    q = _make_q(b, s_q, h_q, dtype, q_layout, q_scale, gen, device)
    k_cache = _make_k(valid, h_kv, dtype, k_layout, k_scale, gen, device)
    block_table = torch.tensor(table, dtype=torch.int32).reshape(b, width).to(device)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32).to(device)
    return PagedCase(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                     seqlens=lens, valid=valid.to(device), dtype=dtype, q_layout=q_layout,
                     k_layout=k_layout, q_scale=q_scale, k_scale=k_scale)


@pytest.fixture
def make_case():
    return build_paged_case


# ----------------------------------------------------------------------------------------------
# FP8 cases (dense FP8 format: float8_e4m3fn cache and optionally q, per-tensor descales)
# ----------------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_NAN_CODES = (0x7F, 0xFF)  # the two e4m3fn NaN bytes (+NaN, -NaN)


def fp8_nan_codes(shape, gen: torch.Generator, device) -> torch.Tensor:
    """uint8 tensor of ``shape`` holding 0x7f and 0xff at random (both NaN signs)."""
    pick = torch.randint(0, 2, tuple(shape), generator=gen, device=device, dtype=torch.uint8)
    return pick * 0x80 + 0x7F


def _fp8_laid_out_like(like: torch.Tensor, dense_fp8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An FP8 view with ``like``'s shape, strides (in elements) and storage offset, over a buffer
    of NaN codes of as many elements as ``like``'s storage, holding ``dense_fp8``'s values: the
    strided layouts of build_paged_case in one-byte elements, padding poisoned."""
    n = like.untyped_storage().nbytes() // like.element_size()
    buf = fp8_nan_codes((n,), gen, like.device).view(FP8)
    view = buf.as_strided(like.shape, like.stride(), like.storage_offset())
    view.view(torch.uint8).copy_(dense_fp8.view(torch.uint8))
    return view


@dataclasses.dataclass
class Fp8Case:
    """A PagedCase in the dense FP8 format: what the kernel gets (``q``, ``k_cache``, the
    descales) and the 16-bit problem it was quantized from (``base``). The kernel must use
    ``float(k_cache) * descale_k`` (and ``float(q) * descale_q`` for an FP8 q);
    ``reference_inputs()`` gives exactly those values for the float reference."""

    base: PagedCase
    q: torch.Tensor
    k_cache: torch.Tensor
    descale_q: Optional[torch.Tensor]
    descale_k: torch.Tensor
    unused: torch.Tensor  # (num_blocks, page) bool: slots no request reads (NaN codes)

    block_table = property(lambda self: self.base.block_table)
    cache_seqlens = property(lambda self: self.base.cache_seqlens)
    seqlens = property(lambda self: self.base.seqlens)
    b = property(lambda self: self.base.b)
    s_q = property(lambda self: self.base.s_q)
    h_q = property(lambda self: self.base.h_q)
    h_kv = property(lambda self: self.base.h_kv)
    page = property(lambda self: self.base.page)
    num_blocks = property(lambda self: self.base.num_blocks)
    rows_per_kv_head = property(lambda self: self.base.rows_per_kv_head)

    @property
    def fp8_q(self) -> bool:
        return self.q.dtype == FP8

    @property
    def out_dtype(self) -> torch.dtype:
        """bfloat16 for an FP8 q, else q's dtype (the contract)."""
        return torch.bfloat16 if self.fp8_q else self.q.dtype

    def descales(self) -> dict:
        """The keyword arguments of the call: descale_k, and descale_q for an FP8 q."""
        out = dict(descale_k=self.descale_k)
        if self.descale_q is not None:
            out["descale_q"] = self.descale_q
        return out

    def reference_inputs(self):
        """(q, k_cache) as float32 values the kernel must use, from the current contents and
        descales (unused slots stay NaN: the reference never reads them)."""
        from flash_mla.kv_formats import dequantize_kv_cache_fp8

        k = dequantize_kv_cache_fp8(self.k_cache, self.descale_k, torch.float32)
        q = dequantize_kv_cache_fp8(self.q, self.descale_q, torch.float32) if self.fp8_q else self.q
        return q, k

    def describe(self) -> str:
        q = "fp8" if self.fp8_q else str(self.q.dtype).replace("torch.", "")
        return f"FP8 cache, q {q}: {self.base.describe()}"


def quantize_case_fp8(case: PagedCase, *, fp8_q: bool = False, seed: int = 0) -> Fp8Case:
    """``case`` in the dense FP8 format, with ``flash_mla.kv_formats``' helpers.

    * The cache: ``quantize_kv_cache_fp8`` with the used slots (``used_slots_mask``, checked
      against the case's own record) setting the scale, laid out as ``case.k_cache`` (same
      strides in elements, padding included); every unused slot and every padding byte holds a
      NaN code, 0x7f or 0xff at random.
    * ``fp8_q``: q quantized too (``quantize_q_fp8``), laid out as ``case.q`` with NaN-code
      padding; otherwise the case's own 16-bit q.
    """
    from flash_mla.kv_formats import quantize_kv_cache_fp8, quantize_q_fp8, used_slots_mask

    gen = _generator(case.q.device, seed ^ 0x5EED)
    used = used_slots_mask(case.block_table, case.cache_seqlens, case.num_blocks, case.page)
    assert torch.equal(used, case.valid.to(used.device)), "used_slots_mask disagrees with the case"
    k_dense, descale_k = quantize_kv_cache_fp8(case.k_cache, valid_mask=used)
    k_cache = _fp8_laid_out_like(case.k_cache, k_dense, gen)
    unused = ~used
    k_bytes = k_cache.view(torch.uint8)
    n_unused = int(unused.sum())
    if n_unused:
        k_bytes[unused] = fp8_nan_codes((n_unused, case.h_kv, HEAD_DIM), gen, k_cache.device)
        junk = k_bytes[unused]
        assert ((junk == FP8_NAN_CODES[0]) | (junk == FP8_NAN_CODES[1])).all()
    assert not ((k_bytes[used] & 0x7F) == 0x7F).any(), "a used slot quantized to NaN"
    descale_q = None
    q = case.q
    if fp8_q:
        q_dense, descale_q = quantize_q_fp8(case.q)
        q = _fp8_laid_out_like(case.q, q_dense, gen)
    return Fp8Case(base=case, q=q, k_cache=k_cache, descale_q=descale_q, descale_k=descale_k,
                   unused=unused)


# ----------------------------------------------------------------------------------------------
# Comparison with the reference
# ----------------------------------------------------------------------------------------------

# rel:     bound on ||out - ref|| / ||ref||, over the whole output and over every (request,
#          token, head) row of 512 values.
# row_max: bound on |out - ref| per element, relative to the largest |ref| of its row.
# Rounding P and out to bf16 gives row errors of ~0.2 %, fp16 ~0.05 %.
TOLERANCES = {
    torch.bfloat16: dict(rel=1e-2, row_max=2e-2),
    torch.float16: dict(rel=3e-3, row_max=6e-3),
}
LSE_ATOL = 2e-3


def _unravel(flat: int, shape) -> List[int]:
    idx = []
    for size in reversed(tuple(shape)):
        flat, r = divmod(flat, size)
        idx.append(r)
    return idx[::-1]


def assert_decode_matches(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor,
                          ref_lse: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Checks a kernel result against the reference.

    * shapes, dtypes (out in the input dtype, lse float32) and device;
    * every out element finite; lse finite exactly where the reference's is;
    * rows with no visible key (reference lse == +inf): lse == +inf and out == 0 exactly;
    * out: relative Frobenius error (whole tensor and every row) and per-row max error;
    * lse: absolute error <= LSE_ATOL on finite entries.
    """
    tol = TOLERANCES[dtype]
    tag = f"[{what}] " if what else ""
    b, s_q, h_q, dv = ref_out.shape
    assert out.shape == (b, s_q, h_q, dv), f"{tag}out shape {tuple(out.shape)}"
    assert lse.shape == (b, h_q, s_q), f"{tag}lse shape {tuple(lse.shape)}"
    assert out.dtype == dtype, f"{tag}out dtype {out.dtype}, expected {dtype}"
    assert lse.dtype == torch.float32, f"{tag}lse dtype {lse.dtype}"
    assert out.device == ref_out.device and lse.device == ref_out.device, f"{tag}device"

    o = out.float()
    ref_out = ref_out.float()
    ref_lse = ref_lse.float()

    bad = ~torch.isfinite(o)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{tag}{int(bad.sum())} non-finite out values, first at "
                             f"(b, t, h, c) = {idx}: {o[tuple(idx)].item()}")

    empty = torch.isinf(ref_lse) & (ref_lse > 0)  # (b, h_q, s_q)
    assert torch.isfinite(ref_lse[~empty]).all(), "reference lse has NaN / -inf"
    lse_empty = lse[empty]
    if not (lse_empty == math.inf).all():
        idx = (empty & (lse != math.inf)).nonzero()[0].tolist()
        raise AssertionError(f"{tag}row with no visible key at (b, h, t) = {idx} has lse "
                             f"{lse[tuple(idx)].item()}, expected +inf")
    lse_full = lse[~empty]
    if not torch.isfinite(lse_full).all():
        idx = (~empty & ~torch.isfinite(lse)).nonzero()[0].tolist()
        raise AssertionError(f"{tag}lse at (b, h, t) = {idx} is {lse[tuple(idx)].item()}, "
                             f"reference {ref_lse[tuple(idx)].item()}")
    empty_rows = empty.permute(0, 2, 1)  # (b, s_q, h_q)
    zeros_bad = empty_rows.unsqueeze(-1) & (o != 0)
    if zeros_bad.any():
        idx = zeros_bad.nonzero()[0].tolist()
        raise AssertionError(f"{tag}row with no visible key has out != 0 at (b, t, h, c) = "
                             f"{idx}: {o[tuple(idx)].item()}")

    if lse_full.numel():
        lse_err = (lse - ref_lse).abs().masked_fill(empty, 0)
        idx = _unravel(int(lse_err.argmax()), lse.shape)
        assert lse_err.max().item() <= LSE_ATOL, (
            f"{tag}lse error {lse_err.max().item():.3g} > {LSE_ATOL} at (b, h, t) = {idx}: "
            f"{lse[tuple(idx)].item()} vs {ref_lse[tuple(idx)].item()}")

    full_rows = ~empty_rows
    if not full_rows.any():
        return
    diff = o - ref_out
    ref_norm = ref_out.norm()
    rel = (diff.norm() / ref_norm).item()
    assert rel <= tol["rel"], f"{tag}relative error {rel:.3g} > {tol['rel']}"

    row_err = diff.norm(dim=-1)
    row_ref = ref_out.norm(dim=-1)
    row_rel = torch.where(full_rows, row_err / row_ref.clamp_min(1e-30), torch.zeros_like(row_err))
    if row_rel.max().item() > tol["rel"]:
        idx = _unravel(int(row_rel.argmax()), row_rel.shape)
        raise AssertionError(f"{tag}row (b, t, h) = {idx}: relative error "
                             f"{row_rel.max().item():.3g} > {tol['rel']} (|ref| = "
                             f"{row_ref[tuple(idx)].item():.3g})")

    row_scale = ref_out.abs().amax(dim=-1, keepdim=True)
    excess = diff.abs() - tol["row_max"] * row_scale
    excess = excess.masked_fill(~full_rows.unsqueeze(-1), -math.inf)
    if excess.max().item() > 0:
        idx = _unravel(int(excess.argmax()), excess.shape)
        raise AssertionError(f"{tag}out at (b, t, h, c) = {idx}: {o[tuple(idx)].item()} vs "
                             f"reference {ref_out[tuple(idx)].item()}, error above "
                             f"{tol['row_max']} x row max {row_scale[tuple(idx[:3])].item():.3g}")


@pytest.fixture
def check_decode():
    return assert_decode_matches


# ----------------------------------------------------------------------------------------------
# Plain helpers for the test modules
# ----------------------------------------------------------------------------------------------

CPU_PARTS = 4  # rows of the fake CPU metadata of cpu_decode_args


def cpu_decode_args(b=2, s_q=1, h_q=16, h_kv=1, dtype=torch.bfloat16, parts=CPU_PARTS, page=PAGE):
    """Decode arguments that are right in every respect except the device (all on the CPU).

    ``page``: tokens per page of ``k_cache`` (dim 1); the block table has enough columns for
    the lengths (70 tokens) at that page size, and ``k_cache`` enough pages for every column.
    With the default page of 64: a (4, 64, h_kv, 576) cache and a (b, 2) block table."""
    width = max(2, pages_of(70, page))
    num_blocks = max(4, b * width)
    return dict(
        q=torch.zeros((b, s_q, h_q, HEAD_DIM), dtype=dtype),
        k_cache=torch.zeros((num_blocks, page, h_kv, HEAD_DIM), dtype=dtype),
        block_table=torch.zeros((b, width), dtype=torch.int32),
        cache_seqlens=torch.full((b,), 70, dtype=torch.int32),
        head_dim_v=HEAD_DIM_V,
        tile_scheduler_metadata=torch.zeros((parts, 8), dtype=torch.int32),
        num_splits=torch.zeros((b + 1,), dtype=torch.int32),
    )


ORDER = ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v",
         "tile_scheduler_metadata", "num_splits")  # the positional arguments, in order


def call(args, **kwargs):
    """flash_mla_with_kvcache on the arguments of ``args`` (a dict keyed by ORDER)."""
    from flash_mla import flash_mla_with_kvcache

    return flash_mla_with_kvcache(*(args[name] for name in ORDER), **kwargs)


@pytest.fixture(params=["direct", "custom_op"])
def path(request, monkeypatch):
    """Runs a test on the direct eager path and again through the torch.library custom ops."""
    from flash_mla import _torch_ops

    monkeypatch.setattr(_torch_ops, "DIRECT_EAGER", request.param == "direct")
    return request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern (NaN-safe, +inf-safe equality)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {a.numel()} values differ"


def capture_graph(fn):
    """Warm up fn on a side stream, then capture it in a CUDA graph; returns (graph, result)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    torch.cuda.synchronize()
    return graph, result


BENCH_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode.py"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_decode.py loaded as a module (one instance per test module)."""
    spec = importlib.util.spec_from_file_location("bench_decode_under_test", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
