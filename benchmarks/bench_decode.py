#!/usr/bin/env python3
"""Times the whole MLA decode call, ``flash_mla.flash_mla_with_kvcache``, against ceilings
measured in the same run, and optionally against another implementation of the same API
(FlashMLA itself) on the same inputs.

What is timed
    One ``flash_mla_with_kvcache`` call: the split-KV kernel and the combine, with the
    allocation of the output, the lse and the workspace. ``get_mla_metadata`` runs once per case
    beforehand and its result is reused, as a serving engine reuses it for every layer of a
    decoding step. N calls (10 to 20) are captured into one CUDA graph and replayed; the time per
    call is the median replay time divided by N. Where one set of inputs (q + k_cache) would fit
    in a few L2 caches, the captured calls rotate among several sets, so the timing is not a
    cache measurement. The KV slots past each request's length in its last page hold NaN (the
    API allows any value there), so a kernel that reads them fails the sanity check.

    Compute-bound rows run at the board's power limit once the GPU is warm. The "burst" column
    (3 replays before the timed ones, after --cool seconds of idle GPU) shows the same call
    before the limit bites; "SM MHz" is the median SM clock while the timed replays ran
    (nvidia-smi samples; "cap": held down by the power limit in most samples).

FLOPs and bytes (d = 576, dv = 512, mean_L = mean of the lengths drawn)
    FLOPs = b * h_q * s_q * mean_L * 2 * (d + dv)      QK^T and PV over every key (the
                                                       causal mask's few saved keys not taken off)
    bytes = b * (mean_L * h_kv * d * kv + s_q * h_q * (d * qb + dv * 2))
                                                       the KV cache read once per KV head, q read,
                                                       out written; kv and qb are the bytes of a
                                                       cache and a q element: 2 (bf16, fp16), 1
                                                       (FP8, --kv-dtype fp8, --fp8-q); out is
                                                       always 16-bit
    The same run measures two ceilings: a device-to-device copy (2 GiB, bytes read + written)
    and an 8192^3 bf16 GEMM on random data. Every row is given as a share of both.

Cases
    Default: the reference rows, the shapes for which FlashMLA publishes H200 figures (b = 128,
    h_kv = 1; compute-bound s_q 1 and 2 at mean L 8K and 32K, memory-bound h_q 16 and 32, and
    one imbalanced batch of four fixed lengths). Lengths are drawn from normal(mean, mean / 2),
    truncated, at least s_q, with a seed derived from the case, so a case gets the same lengths
    whatever else runs with it.
    --sweep serving: the serving envelope in 34 rows, each with a kind that the summaries group
    by: short (b = 128, mean L 128 to 2048, s_q 1 and 2, h_q 128 down to 8, b = 32),
    compute (h_q = 128, s_q 1, 2 and 4, mean L 1K to 32K, causal), memory (s_q = 1, h_q 8 to 32,
    mean L 4K to 16K), batch (b = 1, 8, 512; one request of 54K) and imbalanced (four fixed
    lengths; one 32K request among seven of about 512). It turns --eager on.
    --case K=V,...: extra cases; --no-defaults: only those (a named --sweep still runs);
    --only KIND,...: keep the default or sweep rows of these kinds.

--page-size N
    Tokens per page of the KV cache of every case: 16, 32, 64 (default), 128 or 256. The
    lengths stay the same; the block tables have ceil(L / N) pages per request (in the order
    --pages sets) and the slots past each length in its last page hold NaN. Rows are named
    "... page=N" (and the JSON cases carry page_block_size) when N is not 64. With --compare,
    the compared module gets a copy of the same cache in 64-token pages (same tokens, same
    values, same queries), since FlashMLA takes only 64-token pages; its output is still
    compared with ours.

--page-sizes N,N,...
    Times every row at each of these page sizes (flash_mla only; 64, the baseline, is added if
    missing), e.g. --page-sizes 16,32,64,128,256: the cache of each page size holds the same
    tokens as the 64-token one. Per row and kernel, one CUDA graph per page size, timed
    interleaved as --compare times two modules (each round times every page size in turn);
    reported as t(64) / t(N) per page size (> 1: N-token pages faster than 64), with medians,
    geometric means and the smallest ratio over the rows. Each page size's output is compared
    with the 64-token one's (same tolerances as --compare). The main table shows the 64-token
    figures of that interleaved timing (no burst column). Not combined with --compare,
    --page-size or --eager.

--kv-dtype {bf16,fp16,fp8}
    dtype of the KV cache of every case (default: --dtype). fp8: the 16-bit cache is quantized
    with flash_mla.kv_formats.quantize_kv_cache_fp8 (one float32 descale_k per cache, passed to
    every call; the NaN slots past each length stay NaN codes), the bytes count 1 per cache
    element, and the rows are named "... kv=fp8". A 16-bit --kv-dtype must equal --dtype (q and
    a 16-bit cache share their dtype). Not with --compare.

--fp8-q
    With an FP8 cache, q quantized too (quantize_q_fp8, descale_q; 1 byte per q element; out
    stays bfloat16); rows named "... q=fp8".

--kv-dtypes D,D,...
    Times every row with each of these cache dtypes: --dtype (the baseline, added if missing)
    and fp8 (with --fp8-q, FP8 q as well), e.g. --kv-dtypes bf16,fp8: the FP8 cache holds the
    quantized tokens of the 16-bit one. As --page-sizes: one CUDA graph per dtype, timed
    interleaved; reported as t(16-bit) / t(fp8) per row (> 1: the FP8 cache faster), with
    medians, geometric means and the smallest ratio, and the GB/s of each dtype with its own
    bytes. The FP8 output is compared with the 16-bit one within the quantization error (max
    |out| difference within 20% of max |out|, lse within 0.5; the sanity check compares it
    precisely with a float32 computation on the dequantized cache). Not combined with
    --compare, --page-sizes, --kv-dtype or --eager.

--compare MODULE
    MODULE (an importable module name, a package directory or a .py file) must offer the seed
    API: get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k) and
    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
    tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False). When its
    get_mla_metadata names a seqlen_q parameter, it is given s_q. A directory or file whose name
    is already imported (a FlashMLA build is also called flash_mla) is imported apart, without
    replacing the module already loaded. For each row both implementations get the same
    inputs and their own metadata, are captured in separate CUDA graphs with the same number
    of calls, and are timed interleaved: each round times a batch of replays of ours, then of
    theirs. Medians over the rounds are reported with ratio = t_theirs / t_ours (> 1: flash_mla
    is faster). Once per row the two outputs are compared (max |out| difference within 2% of
    max |out|, lse within 1e-2 where both finite, the same non-finite entries); a disagreement
    marks the row DIFF and makes the exit status 1. The summary gives the rows at >= 1.00x, the
    geometric mean of the ratios (all rows, and rows of mean L <= 1024), the smallest ratio, and
    the same per kind.

--eager
    Besides the graph timing, a plain Python loop of N calls on fixed inputs, metadata reused:
    "wall" = elapsed time of the N back-to-back calls / N, GPU synchronised at both ends;
    "host" = median over the loop of the CPU time of issuing one call (time.perf_counter
    around the call alone; N is small enough that the GPU's launch queue never fills, so this is
    the host cost of a call). For the compared module too, with the ratio of the wall times.

--png PATH
    Horizontal bar chart of the ratio per row with a line at 1.0 (and a panel for the eager
    wall-time ratio when measured), titled with the GPU and the date. Needs matplotlib (Agg
    backend); skipped with a message without it.

--quick
    10 timed rounds after 1 warm-up, 20 eager calls, no burst replays: the serving sweep with
    --compare and --eager then takes a few minutes of GPU time. Each row captures one graph per
    module (one per row and kernel without --compare, two with it); --dry-run prints the count,
    and --max-captures bounds it.

Each (case, kernel) also gets a cheap sanity check (not a correctness test): outputs finite
where a row sees at least one key, exactly 0 / +inf where it sees none, and the rows of the
shortest and longest request compared with a float32 torch computation of the same attention.

Exit status: 0 when every (case, kernel) ran, passed its sanity check and (with --compare)
agreed with the compared module where both ran (with --page-sizes: every page size ran, passed
its sanity check and agreed with the 64-token output); 1 otherwise; 2 for a usage error, a
module that cannot be compared, or when no CUDA device is visible.

Examples:
    python3 benchmarks/bench_decode.py --json out/bench.json
    python3 benchmarks/bench_decode.py --only memory --kernel auto,sm80_small
    python3 benchmarks/bench_decode.py --no-defaults \\
        --case b=64,s_q=1,h_q=128,mean_L=4096,causal=1 --case lens=100/5000/0/77,s_q=2,h_q=8
    python3 benchmarks/bench_decode.py --sweep serving --quick --compare path/to/flash_mla_ref \\
        --png out/ratio.png --json out/sweep.json
    python3 benchmarks/bench_decode.py --sweep serving --only short,batch --eager --quick
    python3 benchmarks/bench_decode.py --sweep serving --dry-run   # list rows, no GPU needed
    python3 benchmarks/bench_decode.py --page-size 16 --compare path/to/flash_mla_ref
    python3 benchmarks/bench_decode.py --sweep serving --quick --page-sizes 16,32,64,128,256 \\
        --json out/pages.json
    python3 benchmarks/bench_decode.py --kv-dtype fp8 --fp8-q
    python3 benchmarks/bench_decode.py --sweep serving --quick --kv-dtypes bf16,fp8 --json out/fp8.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time

D = 576
DV = 512
PAGE = 64  # the default page size, and the only one the compared module is given
PAGE_SIZES = (16, 32, 64, 128, 256)  # page sizes flash_mla takes (--page-size, --page-sizes)
Q_DTYPES = ("bf16", "fp16")  # --dtype: q (and a 16-bit cache)
KV_DTYPES = ("bf16", "fp16", "fp8")  # --kv-dtype, --kv-dtypes
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
KNOWN_KERNELS = ("auto", "sm90", "sm80_large", "sm80_small")
KINDS = ("short", "compute", "memory", "batch", "imbalanced")
SWEEPS = ("serving",)

# Reference rows: the shapes of FlashMLA's published H200 figures, with those figures.
REFERENCE_ROWS = [
    dict(kind="compute", b=128, s_q=1, h_q=128, mean_L=8192, causal=True,
         ref_ms=0.43, ref_rate=630.0, ref_unit="TFLOP/s"),
    dict(kind="compute", b=128, s_q=1, h_q=128, mean_L=32768, causal=True,
         ref_ms=1.66, ref_rate=650.0, ref_unit="TFLOP/s"),
    dict(kind="compute", b=128, s_q=2, h_q=128, mean_L=8192, causal=True,
         ref_ms=0.77, ref_rate=699.0, ref_unit="TFLOP/s"),
    dict(kind="compute", b=128, s_q=2, h_q=128, mean_L=32768, causal=True,
         ref_ms=3.47, ref_rate=623.0, ref_unit="TFLOP/s"),
    dict(kind="memory", b=128, s_q=1, h_q=16, mean_L=8192, causal=False,
         ref_ms=0.28, ref_rate=4040.0, ref_unit="GB/s"),
    dict(kind="memory", b=128, s_q=1, h_q=32, mean_L=16384, causal=False,
         ref_ms=0.57, ref_rate=3960.0, ref_unit="GB/s"),
    dict(kind="imbalanced", b=4, s_q=4, h_q=16, lens=[4641, 45118, 1730, 1696], causal=True,
         ref_ms=0.048, ref_rate=1280.0, ref_unit="GB/s"),
]
REF_NOTE = ("FlashMLA's published figures: one H200, CUDA 13.0, one run (copy 4290 GB/s, "
            "GEMM 700-790 TFLOP/s there)")


# ----------------------------------------------------------------------------------------------
# Cases (standard library only: --dry-run needs neither torch nor a GPU)
# ----------------------------------------------------------------------------------------------

class Case:
    """One benchmark configuration with its drawn KV lengths."""

    def __init__(self, kind, b, s_q, h_q, h_kv=1, mean_L=None, lens=None, causal=False,
                 name=None, ref=None, seed=0):
        self.kind = kind
        self.s_q = int(s_q)
        self.h_q = int(h_q)
        self.h_kv = int(h_kv)
        self.causal = bool(causal)
        self.ref = ref  # dict(ms, rate, unit) for the reference rows
        self.page = PAGE  # tokens per page of the cache (--page-size)
        self.kv_dtype = None  # the cache's dtype when not q's 16-bit one (--kv-dtype fp8)
        self.fp8_q = False  # q in FP8 too (--fp8-q)
        self.target_mean_L = mean_L
        if lens is not None:
            self.lens = [int(x) for x in lens]
            self.b = len(self.lens)
        else:
            self.b = int(b)
            self.lens = draw_lengths(self.b, mean_L, self.s_q, seed,
                                     tag=(self.b, self.s_q, self.h_q, self.h_kv, mean_L))
        self.name = name or self.default_name()

    def default_name(self):
        if self.target_mean_L is None:
            shape = f"b={self.b} L={'/'.join(str(x) for x in self.lens)}" if self.b <= 4 \
                else f"b={self.b} L=explicit"
        else:
            shape = f"b={self.b} L={self.target_mean_L}"
        hkv = f" hkv={self.h_kv}" if self.h_kv != 1 else ""
        return (f"{self.kind} {shape} sq={self.s_q} hq={self.h_q}{hkv}"
                f"{' causal' if self.causal else ''}")

    @property
    def total_L(self):
        return sum(self.lens)

    @property
    def mean_L(self):
        return self.total_L / self.b

    @property
    def nominal_mean_L(self):
        """The mean asked for (drawn cases) or the mean of the explicit lengths."""
        return self.target_mean_L if self.target_mean_L is not None else self.mean_L

    @property
    def flops(self):
        # b * h_q * s_q * mean_L * 2 * (d + dv), with b * mean_L = sum of the lengths
        return float(self.h_q) * self.s_q * self.total_L * 2 * (D + DV)

    @property
    def bytes(self):
        return self.bytes_for(ELEMENT_BYTES.get(self.kv_dtype, 2), 1 if self.fp8_q else 2)

    def bytes_for(self, kv_bytes, q_bytes):
        """b * (mean_L * h_kv * d * kv_bytes + s_q * h_q * (d * q_bytes + dv * 2)): the cache and
        q with elements of kv_bytes and q_bytes bytes, out 16-bit."""
        return float(self.total_L * self.h_kv * D * kv_bytes
                     + self.b * self.s_q * self.h_q * (D * q_bytes + DV * 2))

    def set_page(self, page):
        """Use `page`-token pages; a page size other than 64 goes into the row's name."""
        self.page = int(page)
        if self.page != PAGE:
            self.name += f" page={self.page}"

    def set_fp8(self, fp8_q=False):
        """An FP8 cache (and q with fp8_q): 1-byte elements, ' kv=fp8' (' q=fp8') in the name."""
        self.kv_dtype = "fp8"
        self.fp8_q = bool(fp8_q)
        self.name += " kv=fp8" + (" q=fp8" if self.fp8_q else "")
        self.ref = None  # FlashMLA's published figures are for 16-bit caches

    def describe(self):
        out = dict(name=self.name, kind=self.kind, b=self.b, s_q=self.s_q, h_q=self.h_q,
                   h_kv=self.h_kv, causal=self.causal, target_mean_L=self.target_mean_L,
                   nominal_mean_L=self.nominal_mean_L,
                   mean_L=self.mean_L, min_L=min(self.lens), max_L=max(self.lens),
                   flops=self.flops, bytes=self.bytes, ref=self.ref, lengths=self.lens)
        if self.page != PAGE:
            out["page_block_size"] = self.page
        if self.kv_dtype is not None:
            out["kv_dtype"] = self.kv_dtype
            out["fp8_q"] = self.fp8_q
        return out


def draw_lengths(b, mean_L, s_q, seed, tag):
    """normal(mean, mean / 2), truncated to int, at least s_q; seeded by the case itself so
    that a case gets the same lengths whatever other cases run with it."""
    if mean_L is None or mean_L <= 0:
        raise ValueError("mean_L must be a positive integer (or give lens=...)")
    rng = random.Random(f"flash-mla-bench:{seed}:{':'.join(str(t) for t in tag)}")
    return [int(max(rng.normalvariate(mean_L, mean_L / 2), s_q)) for _ in range(b)]


def reference_cases(seed, only=None):
    out = []
    for row in REFERENCE_ROWS:
        if only and row["kind"] not in only:
            continue
        ref = dict(ms=row["ref_ms"], rate=row["ref_rate"], unit=row["ref_unit"])
        out.append(Case(row["kind"], row["b"], row["s_q"], row["h_q"], 1,
                        mean_L=row.get("mean_L"), lens=row.get("lens"), causal=row["causal"],
                        ref=ref, seed=seed))
    return out


def attach_ref(case, seed):
    """A case with the lengths and shape of a reference row gets that row's figures."""
    for ref_case in reference_cases(seed):
        if (ref_case.lens == case.lens and ref_case.s_q == case.s_q and ref_case.h_q == case.h_q
                and ref_case.h_kv == case.h_kv and ref_case.causal == case.causal):
            case.ref = ref_case.ref
    return case


def serving_sweep(seed, only=None):
    """The serving envelope: h_kv = 1, lengths normal(mean, mean / 2) at least s_q (b = 1: the
    length itself); s_q > 1 rows causal, as speculative decoding runs them."""
    cases = []

    def add(kind, b, s_q, h_q, mean_L=None, lens=None, causal=None, name=None):
        if causal is None:
            causal = s_q > 1
        if b == 1 and lens is None:
            lens, mean_L = [mean_L], None
        cases.append(attach_ref(Case(kind, b, s_q, h_q, 1, mean_L=mean_L, lens=lens,
                                     causal=causal, name=name, seed=seed), seed))

    # Short contexts: where fixed costs (launch, combine, scheduling) show.
    for L in (128, 256, 512, 1024, 2048):
        add("short", 128, 1, 128, L)
    add("short", 128, 2, 128, 1024)
    add("short", 32, 1, 128, 1024)
    for h_q in (64, 32, 16, 8):
        add("short", 128, 1, h_q, 1024)
    add("short", 32, 1, 16, 1024)
    # Long contexts, compute-bound (h_q = 128, causal as the reference rows).
    for s_q in (1, 2):
        for L in (4096, 8192, 32768):
            add("compute", 128, s_q, 128, L, causal=True)
    for L in (1024, 4096):
        add("compute", 128, 4, 128, L, causal=True)
    # Memory-bound: few query heads per GPU (tensor parallelism).
    for h_q in (16, 32):
        for L in (4096, 8192, 16384):
            add("memory", 128, 1, h_q, L)
    add("memory", 128, 1, 8, 8192)
    # Batch sizes (b = 32 and 128 at L 1024 are short rows above).
    for b in (1, 8, 512):
        add("batch", b, 1, 128, 1024)
    add("batch", 1, 1, 128, 54 * 1024)
    add("batch", 512, 1, 16, 2048)
    # Imbalanced batches: the reference row, and one long request among short ones.
    add("imbalanced", 4, 4, 16, lens=[4641, 45118, 1730, 1696], causal=True)
    add("imbalanced", 8, 1, 128, lens=[512, 471, 32768, 540, 498, 523, 455, 509],
        name="imbalanced b=8 L=32768+7x~500 sq=1 hq=128")
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "serving sweep: duplicate row"
    return [c for c in cases if not only or c.kind in only]


_CASE_KEYS = {
    "b": "b", "batch": "b",
    "s_q": "s_q", "sq": "s_q",
    "h_q": "h_q", "hq": "h_q",
    "h_kv": "h_kv", "hkv": "h_kv",
    "mean_l": "mean_L", "l": "mean_L", "mean": "mean_L",
    "causal": "causal",
    "lens": "lens", "lengths": "lens",
    "name": "name", "kind": "kind",
}


def parse_case(text, seed):
    """'b=64,s_q=1,h_q=128,mean_L=4096,causal=1' or 'lens=4641/45118/1730,s_q=4,h_q=16'."""
    fields = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"--case item {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        canon = _CASE_KEYS.get(key.lower())
        if canon is None:
            raise ValueError(f"--case: unknown key {key!r} (known: b, s_q, h_q, h_kv, mean_L, "
                             "causal, lens, name, kind)")
        fields[canon] = value
    try:
        lens = None
        if "lens" in fields:
            lens = [int(x) for x in fields["lens"].replace(":", "/").split("/") if x != ""]
            if not lens or min(lens) < 0:
                raise ValueError("lens must be non-negative integers separated by '/'")
            if "b" in fields and int(fields["b"]) != len(lens):
                raise ValueError(f"b={fields['b']} but {len(lens)} lengths given")
        causal_s = fields.get("causal", "0").lower()
        if causal_s not in ("0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"causal must be 0/1, got {causal_s!r}")
        s_q = int(fields.get("s_q", 1))
        h_q = int(fields.get("h_q", 128))
        h_kv = int(fields.get("h_kv", 1))
        b = int(fields.get("b", 128 if lens is None else len(lens)))
        mean_L = int(fields["mean_L"]) if "mean_L" in fields else None
    except ValueError as exc:
        raise ValueError(f"--case {text!r}: {exc}") from None
    if lens is None and mean_L is None:
        raise ValueError(f"--case {text!r}: give mean_L=... or lens=a/b/c")
    if min(s_q, h_q, h_kv, b) < 1:
        raise ValueError(f"--case {text!r}: b, s_q, h_q, h_kv must be >= 1")
    if h_q % h_kv:
        raise ValueError(f"--case {text!r}: h_q must be a multiple of h_kv")
    case = Case(fields.get("kind", "custom"), b, s_q, h_q, h_kv, mean_L=mean_L, lens=lens,
                causal=causal_s in ("1", "true", "yes"), name=fields.get("name"), seed=seed)
    return attach_ref(case, seed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time flash_mla_with_kvcache by CUDA-graph replay against copy/GEMM ceilings "
                    "and, with --compare, against another implementation of the same API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:" + __doc__.split("Examples:", 1)[1].split("\n\n", 1)[0])
    p.add_argument("--kernel", default="auto",
                   help="comma-separated kernel choices passed as kernel=... "
                        f"({', '.join(KNOWN_KERNELS)}); each case runs with each (default auto)")
    p.add_argument("--sweep", choices=SWEEPS, default=None,
                   help="run a named set of rows instead of the reference rows: 'serving' is "
                        "the serving envelope (short/compute/memory/batch/imbalanced); turns "
                        "--eager on")
    p.add_argument("--only", default=None,
                   help=f"comma-separated kinds of default or sweep rows to run ({', '.join(KINDS)})")
    p.add_argument("--no-defaults", action="store_true",
                   help="drop the reference rows: run only the --case cases (and --sweep)")
    p.add_argument("--case", action="append", default=[], metavar="K=V,...",
                   help="extra case, repeatable: b=, s_q=, h_q=, h_kv=, mean_L=, causal=0|1, "
                        "lens=a/b/c (explicit lengths instead of mean_L), name=, kind=")
    p.add_argument("--compare", default=None, metavar="MODULE",
                   help="time this implementation of FlashMLA's API too, interleaved with "
                        "flash_mla on the same inputs: a module name, a package directory or a "
                        ".py file. It always gets 64-token pages: with --page-size other than "
                        "64, a copy of the same cache in 64-token pages (same tokens and values)")
    p.add_argument("--page-size", type=int, default=PAGE, choices=PAGE_SIZES, metavar="N",
                   help="tokens per page of every case's KV cache: "
                        f"{', '.join(str(x) for x in PAGE_SIZES)} (default {PAGE}); lengths "
                        "unchanged, block tables of ceil(L / N) pages; rows named '... page=N' "
                        "when N is not 64")
    p.add_argument("--page-sizes", default=None, metavar="N,N,...",
                   help="time every row at each of these page sizes (flash_mla only; 64 added "
                        "if missing), interleaved, and report t(64) / t(N) per page size, e.g. "
                        "16,32,64,128,256; not with --compare, --page-size or --eager")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a plain loop of calls (wall and host time per call); on with "
                        "--sweep")
    p.add_argument("--eager-calls", type=int, default=None,
                   help="calls in the eager loop, 1 to 200 (default 50, --quick 20)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="bar chart of the --compare ratios (needs matplotlib)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results here")
    p.add_argument("--seed", type=int, default=0, help="seed of lengths and data (default 0)")
    p.add_argument("--dtype", choices=Q_DTYPES, default="bf16",
                   help="dtype of q (and of the KV cache unless --kv-dtype says otherwise)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="dtype of the KV cache (default: --dtype); fp8: quantized per tensor "
                        "(descale_k), 1 byte per element in the bytes; rows named '... kv=fp8'")
    p.add_argument("--fp8-q", action="store_true",
                   help="with an FP8 cache (--kv-dtype fp8 or --kv-dtypes), quantize q too "
                        "(descale_q, 1 byte per element; out stays bfloat16)")
    p.add_argument("--kv-dtypes", default=None, metavar="D,D,...",
                   help="time every row with each cache dtype (--dtype, added if missing, and "
                        "fp8), interleaved, and report t(16-bit) / t(fp8), e.g. bf16,fp8; not "
                        "with --compare, --page-sizes, --kv-dtype or --eager")
    p.add_argument("--pages", choices=("contiguous", "shuffled"), default="contiguous",
                   help="physical page order: each request's pages consecutive (as FlashMLA's "
                        "benchmark) or a random permutation (default contiguous)")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds (10) and warm-ups (1), 20 eager calls, no burst replays")
    p.add_argument("--reps", type=int, default=None,
                   help="timed graph replays, or rounds with --compare (default 20, --quick 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed graph replays (default 3, --quick 1)")
    p.add_argument("--replays-per-round", type=int, default=0,
                   help="with --compare: graph replays per timed section of each module, "
                        "0 = auto, enough for about 1 ms (default 0)")
    p.add_argument("--cool", type=float, default=0.0, metavar="SECONDS",
                   help="idle time before each case's burst replays, so that they run below the "
                        "board's power limit (the 'burst' column; default 0: they run in "
                        "whatever state the case before left; no effect with --quick)")
    p.add_argument("--calls-per-graph", type=int, default=0,
                   help="calls captured per graph; 0 = auto, 10 to 20 (default 0)")
    p.add_argument("--max-captures", type=int, default=200,
                   help="refuse to run more CUDA-graph captures than this (default 200)")
    p.add_argument("--max-sets", type=int, default=8,
                   help="most q/k_cache sets rotated through (default 8)")
    p.add_argument("--l2-factor", type=float, default=4.0,
                   help="rotate enough sets to cover this many L2 sizes (default 4)")
    p.add_argument("--skip-ceilings", action="store_true", help="do not measure copy/GEMM")
    p.add_argument("--copy-gib", type=float, default=2.0, help="copy ceiling size (default 2)")
    p.add_argument("--gemm-n", type=int, default=8192, help="GEMM ceiling size (default 8192)")
    p.add_argument("--no-spot-check", action="store_true",
                   help="skip the float32 comparison of two requests")
    p.add_argument("--device", type=int, default=None, help="CUDA device index (default current)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cases, lengths, FLOPs, bytes and the number of rows and graph "
                        "captures, then exit (no GPU, no torch needed)")
    args = p.parse_args(argv)

    args.kernels = [k.strip() for k in args.kernel.split(",") if k.strip()]
    if not args.kernels:
        p.error("--kernel: no kernel named")
    if len(set(args.kernels)) != len(args.kernels):
        p.error("--kernel: a kernel is named twice")
    only = None
    if args.only:
        only = [k.strip() for k in args.only.split(",") if k.strip()]
        bad = [k for k in only if k not in KINDS]
        if bad:
            p.error(f"--only: unknown kind(s) {bad}; choose from {', '.join(KINDS)}")
    if args.reps is None:
        args.reps = 10 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.eager_calls is None:
        args.eager_calls = 20 if args.quick else 50
    eager_given = args.eager  # None unless --eager / --no-eager
    if args.eager is None:
        args.eager = args.sweep is not None
    args.burst = not args.quick
    if (args.reps < 1 or args.warmup < 0 or args.max_sets < 1 or args.calls_per_graph < 0
            or args.cool < 0 or args.replays_per_round < 0 or args.max_captures < 1):
        p.error("--reps, --max-sets, --max-captures must be >= 1; --warmup, --calls-per-graph, "
                "--replays-per-round, --cool >= 0")
    if not 1 <= args.eager_calls <= 200:
        p.error("--eager-calls must be 1 to 200 (the launch queue must not fill)")
    args.page_size_list = None
    if args.page_sizes is not None:
        try:
            sizes = [int(x) for x in args.page_sizes.split(",") if x.strip()]
        except ValueError:
            p.error(f"--page-sizes: expected comma-separated integers, got {args.page_sizes!r}")
        bad = [x for x in sizes if x not in PAGE_SIZES]
        if bad or not sizes:
            p.error(f"--page-sizes: {bad or 'none given'}; choose from "
                    f"{', '.join(str(x) for x in PAGE_SIZES)}")
        if len(set(sizes)) != len(sizes):
            p.error("--page-sizes: a page size is named twice")
        if args.compare is not None:
            p.error("--page-sizes times flash_mla alone: not with --compare")
        if args.page_size != PAGE:
            p.error("--page-sizes and --page-size exclude each other (the baseline is 64)")
        if eager_given:
            p.error("--page-sizes does not measure the eager loop: leave out --eager")
        args.eager = False
        args.burst = False  # the page sizes are timed interleaved only
        args.page_size_list = sorted(set(sizes) | {PAGE})
    kv_given = args.kv_dtype is not None
    if args.kv_dtype is None:
        args.kv_dtype = args.dtype
    if args.kv_dtype != "fp8" and args.kv_dtype != args.dtype:
        p.error(f"--kv-dtype {args.kv_dtype} with --dtype {args.dtype}: a 16-bit cache has q's dtype "
                "(use --kv-dtype fp8 for an FP8 cache)")
    if args.kv_dtype == "fp8" and args.compare is not None:
        p.error("--kv-dtype fp8 is not combined with --compare (the compared module gets 16-bit caches)")
    args.kv_dtype_list = None
    if args.kv_dtypes is not None:
        names = [x.strip() for x in args.kv_dtypes.split(",") if x.strip()]
        bad = [x for x in names if x not in (args.dtype, "fp8")]
        if bad or not names:
            p.error(f"--kv-dtypes: {bad or 'none given'}; choose from {args.dtype} (--dtype) and fp8")
        if len(set(names)) != len(names):
            p.error("--kv-dtypes: a dtype is named twice")
        if args.compare is not None:
            p.error("--kv-dtypes times flash_mla alone: not with --compare")
        if args.page_size_list is not None:
            p.error("--kv-dtypes and --page-sizes exclude each other (one baseline at a time)")
        if kv_given:
            p.error("--kv-dtypes and --kv-dtype exclude each other (the baseline is --dtype)")
        if eager_given:
            p.error("--kv-dtypes does not measure the eager loop: leave out --eager")
        args.eager = False
        args.burst = False  # the dtypes are timed interleaved only
        args.kv_dtype_list = [args.dtype] + (["fp8"] if "fp8" in names else [])
    if args.fp8_q and not uses_fp8(args):
        p.error("--fp8-q needs an FP8 cache: --kv-dtype fp8, or fp8 in --kv-dtypes")
    if args.sweep == "serving":
        cases = serving_sweep(args.seed, only)
    elif args.no_defaults:
        cases = []
    else:
        cases = reference_cases(args.seed, only)
    for text in args.case:
        try:
            cases.append(parse_case(text, args.seed))
        except ValueError as exc:
            p.error(str(exc))
    if not cases:
        p.error("no cases selected")
    for c in cases:
        c.set_page(args.page_size)
        if args.kv_dtype == "fp8":
            c.set_fp8(args.fp8_q)
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        p.error(f"cases named twice: {dup} (give name=... to a --case)")
    args.cases = cases
    if args.compare is not None:
        looks_like_path, path = compare_target_path(args.compare)
        if looks_like_path and not os.path.exists(path):
            p.error(f"--compare {args.compare!r}: no such file or directory")
    if capture_count(args) > args.max_captures:
        per = (" x 2 modules" if args.compare else
               f" x {len(args.page_size_list)} page sizes" if args.page_size_list else
               f" x {len(args.kv_dtype_list)} KV dtypes" if args.kv_dtype_list else "")
        p.error(f"{capture_count(args)} CUDA-graph captures planned ({len(cases)} cases x "
                f"{len(args.kernels)} kernels{per}); more than --max-captures {args.max_captures}")
    return args


def capture_count(args):
    """CUDA-graph captures of a run: one per (case, kernel), two with --compare, one per page
    size with --page-sizes, one per KV dtype with --kv-dtypes."""
    variants = getattr(args, "page_size_list", None) or getattr(args, "kv_dtype_list", None)
    per = 2 if args.compare else len(variants) if variants else 1
    return len(args.cases) * len(args.kernels) * per


# ----------------------------------------------------------------------------------------------
# The module compared against (standard library only; imported only when the GPU part runs)
# ----------------------------------------------------------------------------------------------

REQUIRED_FUNCTIONS = ("get_mla_metadata", "flash_mla_with_kvcache")


def compare_target_path(text):
    """(looks like a path, absolute path) of a --compare argument. A name with no path
    separator that is neither an existing file or directory nor ends in .py is a module name."""
    path = os.path.abspath(os.path.expanduser(text))
    looks = (os.sep in text or (os.altsep or os.sep) in text or text.endswith(".py")
             or os.path.exists(text))
    return looks, path


def _module_names(name):
    return [k for k in sys.modules if k == name or k.startswith(name + ".")]


def _import_from(parent, name):
    """Import top-level module or package ``name`` from folder ``parent``. Modules of that name
    already imported (e.g. this library, when the compared build is also called flash_mla) are
    set aside during the import and put back after it: the module returned keeps its own
    submodules through its globals. ``parent`` stays on sys.path, last, for imports the module
    makes when called."""
    saved = {k: sys.modules.pop(k) for k in _module_names(name)}
    sys.path.insert(0, parent)
    try:
        importlib.invalidate_caches()
        module = importlib.import_module(name)
    finally:
        sys.path.remove(parent)
        if parent not in sys.path:
            sys.path.append(parent)
        if saved:
            for k in _module_names(name):
                del sys.modules[k]
            sys.modules.update(saved)
    origin = os.path.abspath(getattr(module, "__file__", "") or "")
    if os.path.dirname(origin) != parent and os.path.dirname(os.path.dirname(origin)) != parent:
        raise ImportError(f"imported {name!r} from {origin or '?'}, not from {parent}")
    return module


def load_compare_module(text):
    """The module --compare names: an importable module name, a package directory (imported
    under the directory's name) or a .py file. It must have FlashMLA's two seed functions."""
    looks_like_path, path = compare_target_path(text)
    if looks_like_path:
        path = path.rstrip(os.sep) or path
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "__init__.py")):
                raise ValueError(f"--compare {text!r}: a directory without __init__.py is not a "
                                 "package")
            parent, name = os.path.split(path)
        elif os.path.isfile(path) and path.endswith(".py"):
            parent, name = os.path.dirname(path), os.path.basename(path)[:-3]
        elif os.path.exists(path):
            raise ValueError(f"--compare {text!r}: neither a .py file nor a package directory")
        else:
            raise ValueError(f"--compare {text!r}: no such file or directory")
        if not name.isidentifier():
            raise ValueError(f"--compare {text!r}: {name!r} is not a valid module name")
        module = _import_from(parent, name)
    else:
        module = importlib.import_module(text)
    missing = [f for f in REQUIRED_FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"--compare {text!r}: module {module.__name__} has no "
                         f"{' or '.join(missing)}")
    return module


def takes_keyword(fn, name):
    """Does fn name a parameter ``name`` that can be passed by keyword (not only **kwargs)?"""
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                inspect.Parameter.KEYWORD_ONLY)


def module_label(module):
    version = getattr(module, "__version__", None)
    return module.__name__ + (f" {version}" if version else "")


# ----------------------------------------------------------------------------------------------
# Formatting and summaries (standard library only; matplotlib only for --png)
# ----------------------------------------------------------------------------------------------

def fmt_time(ms):
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 0.1 else f"{ms:.3f} ms"


def fmt_us(us):
    return "-" if us is None else f"{us:.1f} us"


def fmt_num(x, digits=0, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt_ref(ref):
    if not ref:
        return "-"
    return f"{fmt_time(ref['ms'])} {ref['rate']:.0f} {ref['unit']}"


def _first_line(msg, width=51):
    msg = (msg or "error").splitlines()[0] if msg else "error"
    return msg[:width - 3] + "..." if len(msg) > width else msg


def check_label(res):
    if res.get("error"):
        return "ERROR " + _first_line(res["error"])
    s = res.get("sanity") or {}
    if not s:
        return "-"
    if s.get("ok"):
        label = "ok"
    else:
        label = "FAIL " + "; ".join(s.get("problems", []))[:60]
    if res.get("graph_error"):
        label += " (eager timing: graph failed)"
    return label


def agree_label(cmp):
    """The --compare column: 'ok', 'DIFF ...', 'ERROR ...' (theirs failed) or '-'."""
    if not cmp:
        return "-"
    if cmp.get("error"):
        return "ERROR " + _first_line(cmp["error"], 40)
    a = cmp.get("agreement")
    if not a:
        return "-"
    if a.get("ok"):
        return "ok"
    return "DIFF " + "; ".join(a.get("problems", []))[:60]


def case_ref(case):
    return case.get("ref") or case.get("spec_ref")  # older JSON files call it spec_ref


def table_rows(results, compare=False):
    """results: list of (case_dict, result_dict)."""
    rows = []
    for case, res in results:
        ref = case_ref(case)
        ms = res.get("ms")
        vs = None
        if ref and ms:
            vs = ref["ms"] / ms
        row = [
            case["name"],
            res["kernel"] + (f" ({res['kernel_name']})" if res.get("kernel_name")
                             and res["kernel_name"] != res["kernel"] else ""),
            fmt_time(ms),
            fmt_time(res.get("burst_ms")),
            fmt_num(res.get("tflops"), 1),
            fmt_num(res.get("gbps"), 0),
            fmt_num(res.get("pct_gemm"), 1, "%"),
            fmt_num(res.get("pct_copy"), 1, "%"),
            fmt_ref(ref),
            "-" if vs is None else f"x{vs:.2f}",
            clock_label(res.get("clock")),
        ]
        if compare:
            cmp = res.get("compare") or {}
            row += [fmt_time(cmp.get("ms")), fmt_ratio(cmp.get("ratio")), agree_label(cmp)]
        row.append(check_label(res))
        rows.append(row)
    return rows


TABLE_HEADER = ["case", "kernel", "time/call", "burst", "TFLOP/s", "GB/s", "%GEMM", "%copy",
                "ref (H200)", "ref/ours", "SM MHz", "check"]
COMPARE_COLUMNS = ["theirs", "ratio", "agree"]
NUMERIC_COLUMNS = {"time/call", "burst", "TFLOP/s", "GB/s", "%GEMM", "%copy", "ref/ours",
                   "theirs", "ratio", "b", "s_q", "h_q", "h_kv", "causal", "mean L", "min L",
                   "max L", "GFLOP", "MB", "ours wall", "ours host", "theirs wall",
                   "theirs host", "wall ratio", "host ratio"}


def table_header(compare=False):
    return TABLE_HEADER[:-1] + (COMPARE_COLUMNS if compare else []) + TABLE_HEADER[-1:]


def format_table(header, rows, numeric=None):
    """Plain-text table; columns whose index is in numeric (default: those whose name is in
    NUMERIC_COLUMNS) are right-aligned."""
    if numeric is None:
        numeric = {i for i, h in enumerate(header) if h in NUMERIC_COLUMNS}
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        cells = []
        for i, c in enumerate(r):
            c = str(c)
            cells.append(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]))
        return " | ".join(cells).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def result_pairs(report):
    return [(case, res) for case in report.get("cases", []) for res in case.get("results", [])]


def eager_table(pairs):
    """Rows of the eager loop: wall and host time per call, ours and theirs."""
    rows = []
    for case, res in pairs:
        e = res.get("eager")
        if not e:
            continue
        cmp = res.get("compare") or {}
        te = cmp.get("eager") or {}
        rows.append([case["name"], res["kernel"], fmt_us(e.get("wall_us")),
                     fmt_us(e.get("host_us")), fmt_us(te.get("wall_us")),
                     fmt_us(te.get("host_us")), fmt_ratio(cmp.get("eager_ratio")),
                     fmt_ratio(cmp.get("host_ratio"))])
    header = ["case", "kernel", "ours wall", "ours host", "theirs wall", "theirs host",
              "wall ratio", "host ratio"]
    return format_table(header, rows) if rows else None


def format_report(report):
    lines = []
    settings = report.get("settings") or {}
    cool = settings.get("cool_s", 0)
    env = report.get("env", {})
    if env:
        lines.append(f"GPU: {env.get('gpu_name', '?')} ({env.get('sm_count', '?')} SMs, "
                     f"L2 {env.get('l2_bytes', 0) / 2**20:.0f} MiB), torch "
                     f"{env.get('torch', '?')} / CUDA {env.get('torch_cuda', '?')}, "
                     f"flash_mla {env.get('flash_mla', '?')}")
    c = report.get("ceilings", {})
    cp, gm = c.get("copy") or {}, c.get("gemm") or {}
    copy_s = (f"{cp['gbps']:.0f} GB/s ({cp.get('bytes', 0) / 2**30:.1f} GiB read+written, "
              f"{fmt_time(cp.get('ms'))})" if cp.get("gbps") else cp.get("error", "not measured"))
    gemm_s = (f"{gm['tflops']:.0f} TFLOP/s (bf16 {gm.get('n', '?')}^3, {fmt_time(gm.get('ms'))}, "
              f"SM MHz {clock_label(gm.get('clock'))})"
              if gm.get("tflops") else gm.get("error", "not measured"))
    lines.append(f"ceilings: copy {copy_s}, GEMM {gemm_s}")
    pairs = result_pairs(report)
    compare = bool(report.get("compare")) or any(res.get("compare") for _, res in pairs)
    lines.append(format_table(table_header(compare), table_rows(pairs, compare)))
    burst = ("burst: the median of 3 graph replays (after 1 untimed) before the timed ones, per "
             "call" + (f", each case after {cool:g} s idle, below the power limit" if cool else
                       ", in the state the case before left") + "; the rates are the median's.")
    if settings.get("burst") is False:
        burst = ("burst: not measured (--page-sizes)." if settings.get("page_sizes") and not
                 settings.get("quick") else "burst: not measured (--quick).")
    lines.append("time/call: median over graph replays / calls per graph; ref/ours > 1 means "
                 "faster than the reference figure (" + REF_NOTE + "). SM MHz: median SM clock "
                 "while the replays ran (nvidia-smi, 50 ms samples), 'cap': the board's power "
                 "limit held it down in most samples. " + burst)
    if compare:
        name = (report.get("compare") or {}).get("label", "the compared module")
        lines.append(f"theirs: {name}, same inputs, own graph, timed interleaved with ours; "
                     "ratio = t_theirs / t_ours (> 1: flash_mla faster); agree: outputs within "
                     "2% of max |out|, lse within 1e-2.")
    et = eager_table(pairs)
    if et:
        lines.append("")
        lines.append("eager loop (no graph, metadata reused): wall = elapsed / calls between two "
                     "synchronisations; host = median CPU time of issuing one call")
        lines.append(et)
    summ = report.get("compare_summary") or {}
    if summ.get("lines"):
        lines.append("")
        lines.extend(summ["lines"])
    page = settings.get("page_block_size") or PAGE
    if page != PAGE:
        lines.append(f"page size: {page} tokens per page"
                     + (f" (theirs: the same cache in {PAGE}-token pages)" if compare else ""))
    pt = page_size_table(pairs)
    if pt:
        lines.append("")
        lines.append(f"page sizes (flash_mla only, same tokens, one CUDA graph per page size, timed "
                     f"interleaved): t(page) per call and t({PAGE}) / t(page), > 1: faster than "
                     f"{PAGE}-token pages; check: each page size's sanity check and its output "
                     f"against the {PAGE}-token one's (2% of max |out|, lse 1e-2)")
        lines.append(pt)
        psumm = report.get("page_size_summary") or page_size_summary(report)
        if psumm.get("lines"):
            lines.append("")
            lines.extend(psumm["lines"])
    kv = settings.get("kv_dtype")
    if kv == "fp8" and not settings.get("kv_dtypes"):
        lines.append("KV cache: FP8 (float8_e4m3fn, per-tensor descale_k), 1 byte per element in the "
                     "bytes" + ("; q FP8 too" if settings.get("fp8_q") else ""))
    kt = kv_dtype_table(pairs)
    if kt:
        lines.append("")
        lines.append("KV dtypes (flash_mla only, same tokens, one CUDA graph per dtype, timed "
                     "interleaved): t(dtype) per call, GB/s with the dtype's own bytes, and "
                     "t(16-bit) / t(dtype), > 1: faster than the 16-bit cache"
                     + (" (FP8 q with the FP8 cache)" if settings.get("fp8_q") else "")
                     + "; check: each dtype's sanity check and its output against the 16-bit one's "
                     f"({FP8_AGREEMENT['out_rel']:.0%} of max |out|, lse {FP8_AGREEMENT['lse_atol']})")
        lines.append(kt)
        ksumm = report.get("kv_dtype_summary") or kv_dtype_summary(report)
        if ksumm.get("lines"):
            lines.append("")
            lines.extend(ksumm["lines"])
    return "\n".join(lines)


def _page_size_keys(pairs):
    keys = set()
    for _, res in pairs:
        keys |= {int(k) for k in ((res.get("page_sizes") or {}).get("pages") or {})}
    return sorted(keys)


def page_size_table(pairs):
    """The --page-sizes table: per row, the time per call at each page size and the ratios
    t(64) / t(page). None without --page-sizes results."""
    pages = _page_size_keys(pairs)
    if not pages:
        return None
    others = [p for p in pages if p != PAGE]
    header = ["case", "kernel"] + [f"t({p})" for p in pages] + [f"{PAGE}/{p}" for p in others] + ["check"]
    rows = []
    for case, res in pairs:
        ps = (res.get("page_sizes") or {}).get("pages")
        if not ps:
            continue
        bad = page_size_problems(res)
        rows.append([case["name"], res["kernel"]]
                    + [fmt_time((ps.get(str(p)) or {}).get("ms")) for p in pages]
                    + [fmt_ratio((ps.get(str(p)) or {}).get("ratio")) for p in others]
                    + ["; ".join(f"{p}: {why}" for p, why in bad) if bad else "ok"])
    numeric = set(range(2, len(header) - 1))
    return format_table(header, rows, numeric=numeric)


def page_size_entries(report, page):
    """(row name, kind, nominal mean L, ratio t(64) / t(page)) of every --page-sizes result."""
    return _variant_entries(report, "page_sizes", "pages", str(page))


def _variant_entries(report, section, sub, key):
    """(row name, kind, nominal mean L, ratio) of variant ``key`` in every result's
    res[section][sub] (--page-sizes, --kv-dtypes)."""
    pairs = result_pairs(report)
    kernels = {res.get("kernel") for _, res in pairs}
    out = []
    for case, res in pairs:
        e = ((res.get(section) or {}).get(sub) or {}).get(key) or {}
        if e.get("ratio") is None:
            continue
        name = case["name"] + (f" [{res.get('kernel')}]" if len(kernels) > 1 else "")
        mean_L = case.get("nominal_mean_L")
        if mean_L is None:
            mean_L = case.get("target_mean_L") or case.get("mean_L")
        out.append(dict(name=name, kind=case.get("kind", "custom"), mean_L=mean_L, ratio=e["ratio"]))
    return out


def _variant_summary(report, pairs, variants, *, section, sub, base, problems, by, item,
                     label, failed_label, heading, base_output):
    """The summary of the --page-sizes / --kv-dtypes variants (page_size_summary,
    kv_dtype_summary): per variant in ``variants``, summarize_ratios of t(base) / t(variant)
    over res[section][sub] and its format_ratio_summary lines (titled ``label`` of the variant,
    a str.format pattern, "vs" ``base``); the rows where ``problems(res)`` reports a variant as
    failed, each as dict(row=, <item>=, problem=); and a last line "<heading>: all agree with
    the <base_output> output ..." or the failures (each "<row> <failed_label>: <why>"). A dict
    with ``by`` (variant -> summary), 'lines' and 'failed'."""
    out = {by: {}, "lines": []}
    for v in variants:
        summ = summarize_ratios(_variant_entries(report, section, sub, str(v)))
        out[by][str(v)] = summ
        out["lines"] += format_ratio_summary(summ, f"{label.format(v)} vs {base}, CUDA graph, "
                                                   f"t({base}) / t({v})")
    failed = [(case["name"], v, why) for case, res in pairs for v, why in problems(res)]
    out["failed"] = [{"row": n, item: v, "problem": w} for n, v, w in failed]
    if out[by]:
        out["lines"].append(f"{heading}: " + (f"all agree with the {base_output} output and pass "
                                              "the sanity check" if not failed else
                                              f"{len(failed)} failed: " + "; ".join(
                                                  f"{n} {failed_label.format(v)}: {w}"
                                                  for n, v, w in failed)))
    return out


def page_size_summary(report):
    """Per page size other than 64: the summary of t(64) / t(page) over the rows (as the
    --compare summary: rows >= 1.00x, geomean, short-context geomean, smallest, per kind), and
    the rows where a page size failed or disagreed. A dict with 'by_page' and 'lines'."""
    pairs = result_pairs(report)
    return _variant_summary(report, pairs, [p for p in _page_size_keys(pairs) if p != PAGE],
                            section="page_sizes", sub="pages", base=PAGE,
                            problems=page_size_problems, by="by_page", item="page",
                            label="page {}", failed_label="page {}", heading="page sizes",
                            base_output="64-token")


def _kv_dtype_keys(pairs):
    """The --kv-dtypes variants of the results, the baseline first."""
    keys = []
    for _, res in pairs:
        for k in ((res.get("kv_dtypes") or {}).get("dtypes") or {}):
            if k not in keys:
                keys.append(k)
    return keys


def kv_dtype_table(pairs):
    """The --kv-dtypes table: per row, the time per call and GB/s (own bytes) of each KV dtype
    and t(16-bit) / t(fp8). None without --kv-dtypes results."""
    keys = _kv_dtype_keys(pairs)
    if not keys:
        return None
    base, others = keys[0], keys[1:]
    header = (["case", "kernel"] + [f"t({k})" for k in keys] + [f"GB/s({k})" for k in keys]
              + [f"{base}/{k}" for k in others] + ["check"])
    rows = []
    for case, res in pairs:
        ds = (res.get("kv_dtypes") or {}).get("dtypes")
        if not ds:
            continue
        bad = kv_dtype_problems(res)
        rows.append([case["name"], res["kernel"]]
                    + [fmt_time((ds.get(k) or {}).get("ms")) for k in keys]
                    + [fmt_num((ds.get(k) or {}).get("gbps"), 0) for k in keys]
                    + [fmt_ratio((ds.get(k) or {}).get("ratio")) for k in others]
                    + ["; ".join(f"{k}: {why}" for k, why in bad) if bad else "ok"])
    numeric = set(range(2, len(header) - 1))
    return format_table(header, rows, numeric=numeric)


def kv_dtype_summary(report):
    """Per non-baseline KV dtype: the summary of t(16-bit) / t(dtype) over the rows (as the
    --page-sizes one), and the rows where a dtype failed or disagreed. A dict with 'by_dtype'
    and 'lines'."""
    pairs = result_pairs(report)
    keys = _kv_dtype_keys(pairs)
    return _variant_summary(report, pairs, keys[1:], section="kv_dtypes", sub="dtypes",
                            base=keys[0] if keys else None, problems=kv_dtype_problems,
                            by="by_dtype", item="kv_dtype", label="{} cache", failed_label="{}",
                            heading="KV dtypes", base_output="16-bit")


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    if not xs:
        return None
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def ratio_entries(report, key="ratio"):
    """(row name, kind, nominal mean L, ratio) of every result with a --compare ratio under key
    ('ratio': graph timing; 'eager_ratio': eager wall time)."""
    pairs = result_pairs(report)
    kernels = {res.get("kernel") for _, res in pairs}
    out = []
    for case, res in pairs:
        r = (res.get("compare") or {}).get(key)
        if r is None:
            continue
        name = case["name"] + (f" [{res.get('kernel')}]" if len(kernels) > 1 else "")
        mean_L = case.get("nominal_mean_L")
        if mean_L is None:
            mean_L = case.get("target_mean_L") or case.get("mean_L")
        out.append(dict(name=name, kind=case.get("kind", "custom"), mean_L=mean_L, ratio=r))
    return out


def _group_stats(entries):
    rs = [e["ratio"] for e in entries]
    low = min(entries, key=lambda e: e["ratio"]) if entries else None
    return dict(n=len(rs), n_at_least_1=sum(1 for r in rs if r >= 1.0), geomean=geomean(rs),
                min=low["ratio"] if low else None, min_row=low["name"] if low else None)


def summarize_ratios(entries, short_L=1024):
    """Rows >= 1.00x, geomean of all rows and of rows with mean L <= short_L, the smallest
    ratio, and the same per kind (KINDS order first)."""
    out = _group_stats(entries)
    short = [e for e in entries if e["mean_L"] is not None and e["mean_L"] <= short_L]
    out["short_L"] = short_L
    out["n_short"] = len(short)
    out["geomean_short"] = geomean([e["ratio"] for e in short])
    kinds = [k for k in KINDS if any(e["kind"] == k for e in entries)]
    kinds += sorted({e["kind"] for e in entries} - set(kinds))
    out["by_kind"] = {k: _group_stats([e for e in entries if e["kind"] == k]) for k in kinds}
    return out


def format_ratio_summary(summ, title):
    if not summ or not summ.get("n"):
        return [f"{title}: no rows"]
    lines = [f"{title}: {summ['n']} rows, {summ['n_at_least_1']} at >= 1.00x, geomean "
             f"{fmt_ratio(summ['geomean'])}, mean L <= {summ['short_L']}: "
             f"{fmt_ratio(summ['geomean_short'])} ({summ['n_short']} rows), min "
             f"{fmt_ratio(summ['min'])} ({summ['min_row']})"]
    for kind, g in summ["by_kind"].items():
        lines.append(f"  {kind:<10} {g['n']:3d} rows, {g['n_at_least_1']:3d} at >= 1.00x, geomean "
                     f"{fmt_ratio(g['geomean'])}, min {fmt_ratio(g['min'])} ({g['min_row']})")
    return lines


def compare_summary(report):
    """Summaries of the graph and eager ratios and of the output agreement (dict with 'lines')."""
    label = (report.get("compare") or {}).get("label", "the compared module")
    pairs = result_pairs(report)
    cmps = [(case, res.get("compare")) for case, res in pairs if res.get("compare")]
    out = dict(graph=summarize_ratios(ratio_entries(report, "ratio")))
    lines = format_ratio_summary(out["graph"], f"vs {label}, CUDA graph, t_theirs / t_ours")
    eager = ratio_entries(report, "eager_ratio")
    if eager:
        out["eager"] = summarize_ratios(eager)
        lines += format_ratio_summary(out["eager"], f"vs {label}, eager wall time per call")
    checked = [(case, c) for case, c in cmps if c.get("agreement")]
    differ = [case["name"] for case, c in checked if not c["agreement"].get("ok")]
    failed = [case["name"] for case, c in cmps if c.get("error")]
    out.update(n_checked=len(checked), differ=differ, their_errors=failed)
    lines.append(f"outputs: {len(checked) - len(differ)} of {len(checked)} compared rows agree"
                 + (f"; DIFFER: {', '.join(differ)}" if differ else "")
                 + (f"; {len(failed)} rows where theirs failed: {', '.join(failed)}"
                    if failed else ""))
    out["lines"] = lines
    return out


def summary_line(report, json_path=None):
    pairs = [res for _, res in result_pairs(report)]
    bad = [r for r in pairs if r.get("error") or not (r.get("sanity") or {}).get("ok")
           or page_size_problems(r) or kv_dtype_problems(r)]
    c = report.get("ceilings", {})
    cp, gm = c.get("copy") or {}, c.get("gemm") or {}
    cmp = ""
    summ = report.get("compare_summary") or {}
    g = summ.get("graph") or {}
    if g.get("n"):
        cmp = (f"; vs {(report.get('compare') or {}).get('label', '?')}: {g['n_at_least_1']}/"
               f"{g['n']} rows >= 1.00x, geomean {fmt_ratio(g['geomean'])}, min "
               f"{fmt_ratio(g['min'])}, {len(summ.get('differ', []))} disagree")
    pages = ""
    by_page = (report.get("page_size_summary") or {}).get("by_page") or {}
    if by_page:
        pages = (f"; t({PAGE})/t(page) geomean (min): " + ", ".join(
            f"{k} {fmt_ratio(v.get('geomean'))} ({fmt_ratio(v.get('min'))})"
            for k, v in sorted(by_page.items(), key=lambda x: int(x[0]))))
    dtypes = ""
    by_dtype = (report.get("kv_dtype_summary") or {}).get("by_dtype") or {}
    if by_dtype:
        base = (report.get("settings") or {}).get("dtype", "16-bit")
        dtypes = "; " + ", ".join(f"t({base})/t({k}) geomean {fmt_ratio(v.get('geomean'))} (min "
                                  f"{fmt_ratio(v.get('min'))})" for k, v in by_dtype.items())
    return (f"bench_decode: {len(report.get('cases', []))} cases x "
            f"{len(report.get('kernels', []))} kernels, {len(pairs) - len(bad)} ok, "
            f"{len(bad)} failed; copy {fmt_num(cp.get('gbps'), 0)} GB/s, GEMM "
            f"{fmt_num(gm.get('tflops'), 0)} TFLOP/s" + cmp + pages + dtypes
            + (f"; json: {json_path}" if json_path else ""))


def write_png(report, path):
    """Bar chart of the --compare ratios (graph, and eager wall time when measured). Returns a
    one-line message saying what was written or why nothing was."""
    panels = [(t, e) for t, e in (
        ("CUDA graph: t_theirs / t_ours", ratio_entries(report, "ratio")),
        ("eager loop: wall time theirs / ours", ratio_entries(report, "eager_ratio"))) if e]
    if not panels:
        return "--png: no ratios to plot (it needs --compare and rows that ran)"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"--png skipped: matplotlib not importable ({exc})"
    env = report.get("env") or {}
    when = (env.get("time_utc") or datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"))[:10]
    label = (report.get("compare") or {}).get("label", "compared module")
    n = max(len(e) for _, e in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 1.2 + 0.28 * n),
                             squeeze=False)
    for ax, (title, entries) in zip(axes[0], panels):
        names = [e["name"] for e in entries][::-1]
        ratios = [e["ratio"] for e in entries][::-1]
        colors = ["tab:green" if r >= 1.0 else "tab:red" for r in ratios]
        ax.barh(range(len(ratios)), ratios, color=colors, height=0.7)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(ratios)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_ylim(-0.6, len(ratios) - 0.4)
        hi = max(ratios + [1.0])
        ax.set_xlim(0, hi * 1.15)
        for y, r in enumerate(ratios):
            ax.text(r + hi * 0.01, y, f"{r:.2f}", va="center", fontsize=6)
        g = geomean(ratios)
        ax.set_title(f"{title}\ngeomean {fmt_ratio(g)}, > 1: flash_mla faster", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"flash_mla vs {label} on {env.get('gpu_name', 'GPU ?')}, {when}", fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return f"--png: wrote {path} ({sum(len(e) for _, e in panels)} bars)"


def _json_safe(x):
    """Strict JSON: non-finite floats become the strings 'inf', '-inf', 'nan'."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path, report):
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(report), f, indent=1, default=str, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def dry_run(args):
    print(f"{len(args.cases)} cases{f' (sweep {args.sweep})' if args.sweep else ''}, kernels: "
          f"{', '.join(args.kernels)}, dtype {args.dtype}, seed {args.seed}, page size "
          f"{args.page_size}" + (f", KV cache {args.kv_dtype}" if args.kv_dtype != args.dtype else "")
          + (", q fp8" if args.fp8_q else ""))
    rows = []
    header = ["case", "b", "s_q", "h_q", "h_kv", "causal", "mean L", "min L", "max L", "GFLOP", "MB"]
    if args.kv_dtype_list:
        header.append("MB fp8")
    for c in args.cases:
        row = [c.name, c.b, c.s_q, c.h_q, c.h_kv, int(c.causal), f"{c.mean_L:.1f}", min(c.lens),
               max(c.lens), f"{c.flops / 1e9:.2f}", f"{c.bytes / 1e6:.1f}"]
        if args.kv_dtype_list:
            row.append(f"{c.bytes_for(1, 1 if args.fp8_q else 2) / 1e6:.1f}")
        rows.append(row + [fmt_ref(c.ref)])
    print(format_table(header + ["ref (H200)"], rows,
                       numeric={i for i, h in enumerate(header) if h in NUMERIC_COLUMNS | {"MB fp8"}}))
    for c in args.cases:
        print(f"lengths[{c.name}]: {c.lens}")
    kinds = {}
    for c in args.cases:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    n_rows = len(args.cases) * len(args.kernels)
    calls = args.calls_per_graph or 20
    replays = args.warmup + args.reps + (4 if args.burst else 0)
    print(f"estimate: {n_rows} rows ({len(args.cases)} cases x {len(args.kernels)} kernels; "
          + ", ".join(f"{k} {v}" for k, v in kinds.items()) + f"), {capture_count(args)} "
          f"CUDA-graph captures of at most {calls} calls, {replays} replays each"
          + (f" (x replays per round, interleaved with {args.compare})" if args.compare else "")
          + (f"; eager loop of {args.eager_calls} calls per row and module" if args.eager else ""))
    if args.compare:
        print(f"compare: {args.compare} (imported only when run on a GPU)"
              + (f"; given a copy of each cache in {PAGE}-token pages" if args.page_size != PAGE
                 else ""))
    if args.page_size_list:
        print(f"page sizes: {', '.join(str(x) for x in args.page_size_list)}, timed interleaved, "
              f"reported as t({PAGE}) / t(page)")
    if args.kv_dtype_list:
        print(f"KV dtypes: {', '.join(args.kv_dtype_list)}{' (q fp8 with fp8)' if args.fp8_q else ''}, "
              f"timed interleaved, reported as t({args.kv_dtype_list[0]}) / t(fp8); MB: the "
              f"{args.kv_dtype_list[0]} cache's, 'MB fp8' the FP8 one's (1 byte per element)")
    return 0


# ----------------------------------------------------------------------------------------------
# GPU part
# ----------------------------------------------------------------------------------------------

def _median(xs):
    return statistics.median(xs) if xs else None


def _pct(xs, q):
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, int(round(q * (len(ys) - 1)))))]


class ClockSampler:
    """The GPU's SM clock, power and clock-event reasons, sampled by nvidia-smi every 50 ms in a
    background thread. The compute rows run at the board's power limit, where the SM clock (not
    the kernel's cycle count alone) sets the time: each timed section records what it ran at.
    Best effort: without nvidia-smi (or with one that lacks these fields) windows are None."""

    def __init__(self, index):
        self.samples = []  # (perf_counter time, SM MHz, W, reasons bit mask)
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(index),
                 "--query-gpu=clocks.sm,power.draw,clocks_event_reasons.active",
                 "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except Exception:  # noqa: BLE001 - no nvidia-smi: no clock data
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                clk, pw, why = (x.strip() for x in line.split(","))
                self.samples.append((time.perf_counter(), int(clk), float(pw), int(why, 16)))
            except ValueError:
                pass

    def window(self, t0, t1):
        xs = [x for x in self.samples if t0 <= x[0] <= t1]
        if not xs:
            return None
        clk = [x[1] for x in xs]
        return dict(samples=len(xs), sm_mhz_median=_median(clk), sm_mhz_min=min(clk),
                    sm_mhz_max=max(clk), power_w_max=max(x[2] for x in xs),
                    power_capped_share=sum(1 for x in xs if x[3] & 0x4) / len(xs))

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                self.proc.kill()


def clock_label(clock):
    """'1650 MHz, capped' style summary of a ClockSampler window (or '-')."""
    if not clock:
        return "-"
    cap = clock.get("power_capped_share", 0.0)
    return f"{clock['sm_mhz_median']:.0f}" + (" cap" if cap >= 0.5 else "")


def time_events(torch, fn, reps, warmup):
    """Per-call device times in ms of fn(), each between two events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
           for _ in range(reps)]
    for start, end in evs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in evs]


def env_info(torch, dev):
    props = torch.cuda.get_device_properties(dev)
    info = dict(
        gpu_name=props.name,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        total_mem_bytes=props.total_memory,
        l2_bytes=int(getattr(props, "L2_cache_size", 0) or 0),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        python=platform.python_version(),
        host=platform.node(),
        time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv,
    )
    try:
        q = subprocess.run(
            ["nvidia-smi", "-i", str(dev.index), "--query-gpu=driver_version,clocks.sm,"
             "clocks.max.sm,clocks.mem,power.limit,temperature.gpu", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except Exception as exc:  # noqa: BLE001 - best effort only
        info["nvidia_smi"] = f"unavailable: {exc!r}"
    return info


def measure_copy(torch, dev, gib, reps=20, warmup=3):
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    dst = torch.empty_like(src)
    times = time_events(torch, lambda: dst.copy_(src), reps, warmup)
    del src, dst
    ms = _median(times)
    nbytes = 2 * n * 2  # read + write
    return dict(bytes=nbytes, ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, ms_min=min(times),
                ms_max=max(times), reps=reps)


def measure_gemm(torch, dev, n, reps=20, warm_s=0.3):
    gen = torch.Generator(device=dev).manual_seed(1234)
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev, generator=gen)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev, generator=gen)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=dev)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:  # bring the clocks up
        for _ in range(5):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
    times = time_events(torch, lambda: torch.matmul(a, b, out=c), reps, 2)
    del a, b, c
    ms = _median(times)
    flops = 2.0 * n ** 3
    return dict(n=n, flops=flops, ms=ms, tflops=flops / (ms * 1e-3) / 1e12, ms_min=min(times),
                ms_max=max(times), reps=reps)


def uses_fp8(args):
    """Does the run use an FP8 cache (--kv-dtype fp8, or fp8 among --kv-dtypes)?"""
    return (getattr(args, "kv_dtype", None) == "fp8"
            or "fp8" in (getattr(args, "kv_dtype_list", None) or ()))


class Inputs:
    """Paged KV cache(s), block table and queries of one case, on the GPU.

    ``page``: tokens per page (default: the case's, i.e. --page-size). With ``source`` (another
    Inputs of the same case) the caches hold the same tokens as the source's, laid out in
    `page`-token pages, and the query sets are the source's own tensors: the same inputs in
    another page size (the compared module's 64-token copy, the --page-sizes variants).
    ``to_fp8`` gives the same inputs with FP8 caches (and queries); ``descales(s)`` are the
    keyword arguments of a call on set s (none for 16-bit inputs)."""

    def __init__(self, torch, case, args, dev, dtype, l2_bytes, page=None, source=None):
        self.torch = torch
        page = int(page or getattr(case, "page", PAGE))
        self.page = page
        self.kv_dtype = None  # 16-bit: the dtype of q; "fp8" after to_fp8
        self.descale_ks = self.descale_qs = None
        self.out_dtype = dtype
        b, lens = case.b, case.lens
        gen_cpu = torch.Generator().manual_seed(args.seed * 1000003 + 17)
        pages_per = [(L + page - 1) // page for L in lens]
        num_pages = max(1, sum(pages_per))
        width = max(1, max(pages_per))
        if args.pages == "shuffled":
            order = torch.randperm(num_pages, generator=gen_cpu).tolist()
        else:
            order = list(range(num_pages))
        # Columns past ceil(L/page) hold junk, as the API allows: valid page ids, not ours.
        table = torch.randint(0, num_pages, (b, width), generator=gen_cpu, dtype=torch.int32)
        tail = []  # flat token slots past L in each request's last page
        off = 0
        for i, (L, n) in enumerate(zip(lens, pages_per)):
            if n:
                table[i, :n] = torch.tensor(order[off:off + n], dtype=torch.int32)
                last = order[off + n - 1]
                tail.extend(range(last * page + L - (n - 1) * page, (last + 1) * page))
            off += n
        self.block_table = table.to(dev)
        self.cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
        self.num_pages = num_pages
        # Sets are sized with the element sizes of the smallest inputs of the run (FP8 caches
        # and queries rotate as many sets as the 16-bit ones they come from).
        fp8 = uses_fp8(args)
        kv_bytes, q_bytes = (1 if fp8 else 2), (1 if fp8 and getattr(args, "fp8_q", False) else 2)
        self.set_bytes = num_pages * page * case.h_kv * D * kv_bytes + b * case.s_q * case.h_q * D * q_bytes
        if source is not None:
            self.n_sets = source.n_sets
            self.qs = source.qs
            self.kv_dtype, self.out_dtype = source.kv_dtype, source.out_dtype
            self.descale_ks, self.descale_qs = source.descale_ks, source.descale_qs
            src, dst = self._token_slots(torch, source, lens, dev), self._token_slots(torch, self, lens, dev)
            self.ks = []
            for k_src in source.ks:
                # Copied as raw elements (FP8 included): NaN, or its FP8 code, past each length.
                nan = torch.full((1,), float("nan"), dtype=torch.float32, device=dev).to(k_src.dtype)
                k = torch.empty((num_pages, page, case.h_kv, D), dtype=k_src.dtype, device=dev)
                raw = _raw(torch, k)
                raw.copy_(_raw(torch, nan).expand(raw.shape))
                if dst.numel():
                    raw.view(num_pages * page, case.h_kv, D)[dst] = \
                        _raw(torch, k_src).reshape(-1, case.h_kv, D)[src]
                self.ks.append(k)
            return
        if l2_bytes > 0:
            want = math.ceil(args.l2_factor * l2_bytes / self.set_bytes)
        else:
            want = 1
        self.n_sets = max(1, min(args.max_sets, want))
        tail_idx = torch.tensor(tail, dtype=torch.long, device=dev) if tail else None
        gen = torch.Generator(device=dev).manual_seed(args.seed * 7919 + 1)
        self.qs, self.ks = [], []
        for _ in range(self.n_sets):
            k = torch.randn(num_pages, page, case.h_kv, D, dtype=dtype, device=dev, generator=gen)
            if tail_idx is not None:
                k.view(num_pages * page, case.h_kv, D)[tail_idx] = float("nan")
            q = torch.randn(b, case.s_q, case.h_q, D, dtype=dtype, device=dev, generator=gen)
            self.ks.append(k)
            self.qs.append(q)

    @staticmethod
    def _token_slots(torch, inp, lens, dev):
        """Flat cache slot (page * page_size + offset) of token j of request i, for every
        token of every request in order: (sum of lens,) int64 on dev."""
        table = inp.block_table.long()
        parts = []
        for i, L in enumerate(lens):
            if L:
                j = torch.arange(L, device=dev)
                parts.append(table[i, j // inp.page] * inp.page + j % inp.page)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=dev)

    def with_page(self, torch, case, args, dev, page):
        """The same inputs (tokens, values, queries) in `page`-token pages (self if equal)."""
        if page == self.page:
            return self
        return Inputs(torch, case, args, dev, self.out_dtype, 0, page=page, source=self)

    def to_fp8(self, torch, kv_formats, fp8_q=False):
        """The same inputs with every cache set in FP8 (kv_formats.quantize_kv_cache_fp8: one
        float32 descale_k per set, the NaN slots past each length stored as NaN codes) and,
        with fp8_q, every query set too (quantize_q_fp8, out then bfloat16). Shares the block
        table and lengths; self is left as it is."""
        out = copy.copy(self)
        out.kv_dtype = "fp8"
        out.ks, out.descale_ks = [], []
        for k in self.ks:
            k8, descale = kv_formats.quantize_kv_cache_fp8(k)
            out.ks.append(k8)
            out.descale_ks.append(descale)
        if fp8_q:
            out.qs, out.descale_qs = [], []
            for q in self.qs:
                q8, descale = kv_formats.quantize_q_fp8(q)
                out.qs.append(q8)
                out.descale_qs.append(descale)
            out.out_dtype = torch.bfloat16
        return out

    def descales(self, s):
        """The descale keyword arguments of a call on set s ({} for 16-bit inputs)."""
        kw = {}
        if self.descale_ks is not None:
            kw["descale_k"] = self.descale_ks[s]
        if self.descale_qs is not None:
            kw["descale_q"] = self.descale_qs[s]
        return kw


def _raw(torch, t):
    """t's elements as integers of the same size (copies and gathers of any dtype, FP8
    included, without arithmetic on it)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def visible_mask(torch, case, dev):
    """(b, s_q) bool: does query token t of request i see at least one key?"""
    L = torch.tensor(case.lens, dtype=torch.int64, device=dev)[:, None]
    t = torch.arange(case.s_q, device=dev)[None, :]
    if case.causal and case.s_q > 1:
        return (L - case.s_q + t) >= 0
    return (L > 0).expand(case.b, case.s_q)


def spot_reference(torch, case, inp, set_idx, i, scale):
    """float32 out (s_q, h_q, dv) and lse (h_q, s_q) of request i, or None if it sees nothing."""
    L = case.lens[i]
    if L == 0:
        return None
    s_q, h_q, h_kv = case.s_q, case.h_q, case.h_kv
    g = h_q // h_kv
    page = inp.page
    n = (L + page - 1) // page
    pages = inp.block_table[i, :n].long()
    k_all = inp.ks[set_idx]
    K = _raw(torch, k_all)[pages].view(k_all.dtype)  # gathered as raw elements: FP8 too
    K = K.reshape(n * page, h_kv, D)[:L].float().permute(1, 0, 2)
    Q = inp.qs[set_idx][i].float().reshape(s_q, h_kv, g, D).permute(1, 0, 2, 3)
    scales = inp.descales(set_idx)  # FP8: the values the kernel must use
    if "descale_k" in scales:
        K = K * scales["descale_k"]
    if "descale_q" in scales:
        Q = Q * scales["descale_q"]
    Q = Q.reshape(h_kv, s_q * g, D)
    S = torch.bmm(Q, K.transpose(1, 2)) * scale  # (h_kv, rows, L), row = t * g + hh
    if case.causal and s_q > 1:
        t = torch.arange(s_q * g, device=S.device) // g
        j = torch.arange(L, device=S.device)
        S.masked_fill_((j[None, :] > (L - s_q + t)[:, None])[None], float("-inf"))
    lse = torch.logsumexp(S, dim=-1)  # (h_kv, rows); -inf for rows with no key
    P = torch.exp(S - lse[..., None])
    O = torch.bmm(P, K[..., :DV])
    O = O.reshape(h_kv, s_q, g, DV).permute(1, 0, 2, 3).reshape(s_q, h_q, DV)
    lse = lse.reshape(h_kv, s_q, g).permute(0, 2, 1).reshape(h_q, s_q)
    return O, lse


def sanity(torch, case, inp, out, lse, set_idx, spot, scale):
    problems = []
    info = {}
    want_out = (case.b, case.s_q, case.h_q, DV)
    want_lse = (case.b, case.h_q, case.s_q)
    if tuple(out.shape) != want_out or tuple(lse.shape) != want_lse:
        problems.append(f"shapes out {tuple(out.shape)} lse {tuple(lse.shape)}")
        return dict(ok=False, problems=problems)
    if lse.dtype != torch.float32 or out.dtype != inp.out_dtype:
        problems.append(f"dtypes out {out.dtype} lse {lse.dtype}")
    vis = visible_mask(torch, case, out.device)  # (b, s_q)
    vis_o = vis[:, :, None, None].expand_as(out)
    vis_l = vis[:, None, :].expand_as(lse)
    n_bad_out = int((~torch.isfinite(out) & vis_o).sum())
    n_bad_lse = int((~torch.isfinite(lse) & vis_l).sum())
    if n_bad_out or n_bad_lse:
        problems.append(f"non-finite: {n_bad_out} out, {n_bad_lse} lse")
    if not bool(vis.all()):
        n_nz = int(((out != 0) & ~vis_o).sum())
        n_ninf = int(((lse != float("inf")) & ~vis_l).sum())
        if n_nz or n_ninf:
            problems.append(f"empty rows: {n_nz} out != 0, {n_ninf} lse != +inf")
    info["visible_rows"] = int(vis.sum())
    if spot:
        lens = case.lens
        nonzero = [k for k in range(case.b) if lens[k] > 0] or [0]
        picks = sorted({min(nonzero, key=lambda k: lens[k]), max(nonzero, key=lambda k: lens[k])})
        errs = []
        for i in picks:
            ref = spot_reference(torch, case, inp, set_idx, i, scale)
            if ref is None:
                continue
            o_ref, l_ref = ref
            vis_i = vis[i]  # (s_q,)
            o = out[i].float()[vis_i]
            o_r = o_ref[vis_i]
            if o_r.numel() == 0:
                continue
            rel = float((o - o_r).norm() / o_r.norm().clamp_min(1e-30))
            dl = float((lse[i][:, vis_i] - l_ref[:, vis_i]).abs().max())
            if not math.isfinite(rel):
                rel = float("inf")
            if not math.isfinite(dl):
                dl = float("inf")
            errs.append(dict(request=i, L=lens[i], out_rel_err=rel, lse_max_abs_err=dl))
            if not rel <= 3e-2 or not dl <= 5e-2:
                problems.append(f"spot req {i} (L={lens[i]}): out rel {rel:.1e}, lse {dl:.1e}")
        info["spot"] = errs
    info["ok"] = not problems
    info["problems"] = problems
    return info


def _sync_quietly(torch):
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a sticky CUDA error; later steps report it
        pass


def capture_graph(torch, call, n_calls, n_sets):
    """One CUDA graph of call(0) .. call(n_calls - 1); returns (graph, outputs of the last call).
    Each input set is first run once on a side stream (lazy initialisation must not happen
    during the capture), then torch.cuda.graph captures the calls on its own capture stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for j in range(min(n_sets, n_calls)):
            call(j)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    last = None
    with torch.cuda.graph(graph):
        for j in range(n_calls):
            last = call(j)
    torch.cuda.synchronize()
    return graph, last


def time_interleaved(torch, replays, rounds, warmup, per_round):
    """replays: one callable per module (a graph's replay). Each round times, for each module in
    turn, per_round back-to-back calls between two events on the current stream. Returns one
    list of round times in ms per module."""
    for _ in range(warmup):
        for fn in replays:
            fn()
    torch.cuda.synchronize()
    evs = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(rounds)] for _ in replays]
    for r in range(rounds):
        for fn, ev in zip(replays, evs):
            ev[r][0].record()
            for _ in range(per_round):
                fn()
            ev[r][1].record()
    torch.cuda.synchronize()
    return [[s.elapsed_time(e) for s, e in ev] for ev in evs]


def eager_loop(torch, fn, n, warm=3):
    """n back-to-back calls of fn() from Python, no graph. wall_us: elapsed time / n between two
    synchronisations; host_us: median CPU time of one call (perf_counter around it alone). n is
    at most 200, a few launches each: the launch queue does not fill, so the host never waits on
    the GPU inside a call."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    host = []
    t_start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t_start) / n
    return dict(calls=n, wall_us=wall * 1e6, host_us=_median(host) * 1e6,
                host_us_min=min(host) * 1e6, host_us_p90=_pct(host, 0.9) * 1e6)


def agreement(torch, out, lse, t_out, t_lse, out_rel=2e-2, lse_atol=1e-2):
    """Do two implementations' outputs on the same inputs agree? out: max |difference| within
    out_rel * max |out| where both are finite; lse: max |difference| within lse_atol where both
    are finite; and the same entries finite in both."""
    problems = []
    if tuple(t_out.shape) != tuple(out.shape) or tuple(t_lse.shape) != tuple(lse.shape):
        return dict(ok=False, problems=[f"shapes theirs out {tuple(t_out.shape)} lse "
                                        f"{tuple(t_lse.shape)}, ours {tuple(out.shape)} "
                                        f"{tuple(lse.shape)}"])
    info = {}
    for name, a, b in (("out", out, t_out), ("lse", lse, t_lse)):
        a, b = a.float(), b.float()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        both = fa & fb
        info[f"{name}_nonfinite_mismatch"] = int((fa != fb).sum())
        info[f"{name}_max_abs_diff"] = float((a - b)[both].abs().max()) if bool(both.any()) else 0.0
        info[f"{name}_max_abs"] = float(a[fa].abs().max()) if bool(fa.any()) else 0.0
        if info[f"{name}_nonfinite_mismatch"]:
            problems.append(f"{name}: {info[f'{name}_nonfinite_mismatch']} entries finite in "
                            "one only")
    out_tol = out_rel * max(info["out_max_abs"], 1e-6)
    info.update(out_tol=out_tol, lse_tol=lse_atol)
    if not info["out_max_abs_diff"] <= out_tol:
        problems.append(f"out max diff {info['out_max_abs_diff']:.2e} > {out_tol:.2e}")
    if not info["lse_max_abs_diff"] <= lse_atol:
        problems.append(f"lse max diff {info['lse_max_abs_diff']:.2e} > {lse_atol:.0e}")
    info["ok"] = not problems
    info["problems"] = problems
    return info


class Compared:
    """The --compare module on one case at a time: the same input tensors as ours, its own
    metadata (computed once per case, reused by every call, as ours)."""

    def __init__(self, module):
        self.module = module
        self.label = module_label(module)
        self.seqlen_q = takes_keyword(module.get_mla_metadata, "seqlen_q")
        self.case = self.inp = self.meta = self.splits = None
        self.error = None

    def prepare(self, torch, case, inp):
        self.case, self.inp, self.meta, self.splits, self.error = case, inp, None, None, None
        try:
            kw = {"seqlen_q": case.s_q} if self.seqlen_q else {}
            self.meta, self.splits = self.module.get_mla_metadata(
                inp.cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv, **kw)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported in the row
            self.error = f"get_mla_metadata: {type(exc).__name__}: {exc}"
            _sync_quietly(torch)

    def call(self, j):
        inp, s = self.inp, j % self.inp.n_sets
        return self.module.flash_mla_with_kvcache(inp.qs[s], inp.ks[s], inp.block_table,
                                                  inp.cache_seqlens, DV, self.meta, self.splits,
                                                  causal=self.case.causal)

    def release(self):
        self.case = self.inp = self.meta = self.splits = None


def run_kernel(torch, fm, case, inp, meta, splits, kernel, args, ceil, sampler, other=None):
    res = dict(kernel=kernel)
    try:
        res["kernel_name"] = fm.kernel_for_device(inp.block_table.device, kernel)
    except Exception as exc:  # noqa: BLE001
        res["kernel_name_error"] = repr(exc)
    kw = {} if kernel == "auto" else {"kernel": kernel}
    scale = 1.0 / math.sqrt(D)

    def call(j):
        s = j % inp.n_sets
        return fm.flash_mla_with_kvcache(inp.qs[s], inp.ks[s], inp.block_table, inp.cache_seqlens,
                                         DV, meta, splits, causal=case.causal, **kw, **inp.descales(s))

    # Eager call: argument errors surface here, before any capture; then the sanity check and,
    # with --compare, the other module's call on the same inputs (which also plans its
    # schedule where it plans on first use).
    out, lse = call(0)
    torch.cuda.synchronize()
    res["sanity"] = sanity(torch, case, inp, out, lse, 0, not args.no_spot_check, scale)
    cmp = None
    if other is not None:
        cmp = res["compare"] = dict(module=other.label)
        if other.error:
            cmp["error"] = other.error
        else:
            try:
                t_out, t_lse = other.call(0)
                torch.cuda.synchronize()
                cmp["agreement"] = agreement(torch, out, lse, t_out, t_lse)
                del t_out, t_lse
            except Exception as exc:  # noqa: BLE001 - theirs failing is reported, ours goes on
                cmp["error"] = f"call: {type(exc).__name__}: {exc}"
                _sync_quietly(torch)
    del out, lse

    def theirs_ok():
        return cmp is not None and not cmp.get("error")

    eager = time_events(torch, lambda: call(0), 5, 2)
    res["eager_ms"] = _median(eager)
    n_calls = args.calls_per_graph or max(10, min(20, math.ceil(20.0 / max(res["eager_ms"],
                                                                           1e-3))))
    res["calls_per_graph"] = n_calls
    res["n_sets"] = inp.n_sets
    if args.eager:
        res["eager"] = eager_loop(torch, lambda: call(0), args.eager_calls)
        if theirs_ok():
            try:
                cmp["eager"] = eager_loop(torch, lambda: other.call(0), args.eager_calls)
                cmp["eager_ratio"] = cmp["eager"]["wall_us"] / res["eager"]["wall_us"]
                cmp["host_ratio"] = cmp["eager"]["host_us"] / res["eager"]["host_us"]
            except Exception as exc:  # noqa: BLE001
                cmp["error"] = f"eager loop: {type(exc).__name__}: {exc}"
                _sync_quietly(torch)
    try:
        graph, (g_out, g_lse) = capture_graph(torch, call, n_calls, inp.n_sets)
        their_graph = None
        if theirs_ok():
            try:
                their_graph, _ = capture_graph(torch, other.call, n_calls, inp.n_sets)
            except Exception as exc:  # noqa: BLE001
                cmp["error"] = f"graph capture: {type(exc).__name__}: {exc}"
                _sync_quietly(torch)
        # Burst: the first replays after --cool seconds of idle GPU, below the board's power limit.
        if args.burst:
            if args.cool > 0:
                torch.cuda.synchronize()
                time.sleep(args.cool)
            res["burst_ms"] = _median(time_events(torch, graph.replay, 3, 1)) / n_calls
        graphs = [graph] + ([their_graph] if their_graph is not None else [])
        per_round = 1
        if their_graph is not None:
            replay_ms = max(res["eager_ms"] * n_calls, 1e-3)
            per_round = args.replays_per_round or max(1, min(8, math.ceil(1.0 / replay_ms)))
        t0 = time.perf_counter()
        times = time_interleaved(torch, [g.replay for g in graphs], args.reps, args.warmup,
                                 per_round)
        res["clock"] = sampler.window(t0, time.perf_counter())
        per_call = [t / (per_round * n_calls) for t in times[0]]
        res["timing"] = "graph"
        res["replays_per_round"] = per_round
        if their_graph is not None:
            theirs = [t / (per_round * n_calls) for t in times[1]]
            cmp.update(ms=_median(theirs), ms_min=min(theirs), ms_p10=_pct(theirs, 0.1),
                       ms_p90=_pct(theirs, 0.9), rounds=len(theirs), replays_per_round=per_round,
                       calls_per_graph=n_calls)
            cmp["ratio"] = cmp["ms"] / _median(per_call)
            cmp["ratio_paired_median"] = _median([t / o for t, o in zip(theirs, per_call)])
        # The graph's last outputs: finite where expected after replay too.
        vis = visible_mask(torch, case, g_out.device)
        bad = int((~torch.isfinite(g_out) & vis[:, :, None, None]).sum()) + \
            int((~torch.isfinite(g_lse) & vis[:, None, :]).sum())
        if bad:
            res["sanity"]["ok"] = False
            res["sanity"]["problems"].append(f"graph replay: {bad} non-finite")
        del graph, their_graph, graphs, g_out, g_lse
    except Exception as exc:  # noqa: BLE001 - capture failing is itself a finding
        res["graph_error"] = f"{type(exc).__name__}: {exc}"
        res["timing"] = "eager"
        torch.cuda.synchronize()
        per_call = time_events(torch, lambda: call(0), args.reps, args.warmup)
        res["sanity"]["ok"] = False
        res["sanity"]["problems"].append("CUDA-graph capture failed")
        if cmp is not None and "ms" not in cmp and not cmp.get("error"):
            cmp["error"] = "not timed: our CUDA-graph capture failed"
    return record_timing(res, case, per_call, ceil)


def record_timing(res, case, per_call, ceil):
    """The row's time figures from its per-call times (ms): median, spread, TFLOP/s, GB/s, the
    share of the ceilings measured in the same run, and FlashMLA's published figure's ratio."""
    ms = _median(per_call)
    res.update(ms=ms, ms_min=min(per_call), ms_p10=_pct(per_call, 0.1),
               ms_p90=_pct(per_call, 0.9), reps=len(per_call),
               tflops=case.flops / (ms * 1e-3) / 1e12, gbps=case.bytes / (ms * 1e-3) / 1e9)
    if ceil.get("gemm", {}).get("tflops"):
        res["pct_gemm"] = 100.0 * res["tflops"] / ceil["gemm"]["tflops"]
    if ceil.get("copy", {}).get("gbps"):
        res["pct_copy"] = 100.0 * res["gbps"] / ceil["copy"]["gbps"]
    if case.ref:
        res["ref_over_ours"] = case.ref["ms"] / ms
    return res


def run_variants(torch, fm, case, variants, base, meta, splits, kernel, args, ceil, sampler, section,
                 sub, entry, agree):
    """--page-sizes and --kv-dtypes for one (case, kernel), in place of run_kernel. ``variants``
    maps each variant (a page size, a KV dtype) to Inputs holding the same tokens and queries,
    in timing order, ``base`` is the baseline's key. Each variant is called once eagerly (sanity
    check; output compared with the baseline's by ``agree(base_out, base_lse, out, lse)``),
    captured in its own CUDA graph of the same number of calls, and the graphs are timed
    interleaved (each round: every variant in turn, as --compare times two modules). Per
    variant, in ``res[section][sub][str(key)]`` (starting from ``entry(key, inputs)``): medians
    over the rounds and ratio = t(base) / t(variant) (> 1: that variant is faster). The row's
    own figures (time, rates, sanity) are the baseline's."""
    res = dict(kernel=kernel)
    try:
        res["kernel_name"] = fm.kernel_for_device(variants[base].block_table.device, kernel)
    except Exception as exc:  # noqa: BLE001
        res["kernel_name_error"] = repr(exc)
    kw = {} if kernel == "auto" else {"kernel": kernel}
    scale = 1.0 / math.sqrt(D)
    keys = list(variants)

    def caller(inp):
        def call(j):
            s = j % inp.n_sets
            return fm.flash_mla_with_kvcache(inp.qs[s], inp.ks[s], inp.block_table,
                                             inp.cache_seqlens, DV, meta, splits,
                                             causal=case.causal, **kw, **inp.descales(s))
        return call

    calls = {k: caller(variants[k]) for k in keys}
    entries = {k: entry(k, variants[k]) for k in keys}
    # Eager calls first (argument errors surface here, before any capture).
    base_out, base_lse = calls[base](0)
    torch.cuda.synchronize()
    for k in keys:
        e = entries[k]
        try:
            out, lse = (base_out, base_lse) if k == base else calls[k](0)
            torch.cuda.synchronize()
            e["sanity"] = sanity(torch, case, variants[k], out, lse, 0, not args.no_spot_check,
                                 scale)
            if k != base:
                e["agreement"] = agree(base_out, base_lse, out, lse)
            del out, lse
        except Exception as exc:  # noqa: BLE001 - reported in the row, the others go on
            e["error"] = f"call: {type(exc).__name__}: {exc}"
            _sync_quietly(torch)
    del base_out, base_lse
    res["sanity"] = entries[base]["sanity"]
    res["eager_ms"] = _median(time_events(torch, lambda: calls[base](0), 5, 2))
    n_calls = args.calls_per_graph or max(10, min(20, math.ceil(20.0 / max(res["eager_ms"],
                                                                           1e-3))))
    res.update(calls_per_graph=n_calls, n_sets=variants[base].n_sets)
    res[section] = {"calls_per_graph": n_calls, sub: {str(k): e for k, e in entries.items()}}
    graphs = {}
    for k in keys:
        if entries[k].get("error"):
            continue
        try:
            graphs[k], _ = capture_graph(torch, calls[k], n_calls, variants[k].n_sets)
        except Exception as exc:  # noqa: BLE001
            entries[k]["error"] = f"graph capture: {type(exc).__name__}: {exc}"
            _sync_quietly(torch)
    if base not in graphs:
        res["error"] = entries[base].get("error", f"the baseline's ({base}) graph did not run")
        return res
    order = [k for k in keys if k in graphs]
    per_round = args.replays_per_round or max(1, min(8, math.ceil(1.0 / max(res["eager_ms"] * n_calls,
                                                                               1e-3))))
    t0 = time.perf_counter()
    times = time_interleaved(torch, [graphs[k].replay for k in order], args.reps, args.warmup,
                             per_round)
    res["clock"] = sampler.window(t0, time.perf_counter())
    res[section].update(replays_per_round=per_round, clock=res["clock"])
    per_call = {k: [t / (per_round * n_calls) for t in ts] for k, ts in zip(order, times)}
    base_ms = _median(per_call[base])
    for k in order:
        ts = per_call[k]
        entries[k].update(ms=_median(ts), ms_min=min(ts), ms_p10=_pct(ts, 0.1), ms_p90=_pct(ts, 0.9),
                          rounds=len(ts))
        entries[k]["ratio"] = base_ms / entries[k]["ms"]
        entries[k]["ratio_paired_median"] = _median([b / t for b, t in zip(per_call[base], ts)])
    del graphs
    res.update(timing="graph", replays_per_round=per_round)
    return record_timing(res, case, per_call[base], ceil)


def run_page_sizes(torch, fm, case, variants, meta, splits, kernel, args, ceil, sampler):
    """--page-sizes for one (case, kernel), in place of run_kernel: ``variants`` maps each page
    size (PAGE included) to Inputs holding the same tokens and queries. run_variants with the
    64-token pages as the baseline: ratio = t(64) / t(page) (> 1: that page size is faster),
    each output compared with the 64-token one (agreement's tolerances), in
    res["page_sizes"]["pages"]."""
    ordered = {p: variants[p] for p in sorted(variants)}
    return run_variants(torch, fm, case, ordered, PAGE, meta, splits, kernel, args, ceil, sampler,
                        "page_sizes", "pages", lambda p, inp: dict(page=p, num_pages=inp.num_pages),
                        lambda *outs: agreement(torch, *outs))


# An FP8 cache's output differs from the 16-bit one by the quantization (3 mantissa bits): a few
# percent of |out| on random data, lse by up to ~0.2 where few keys count. These bounds catch a
# wrong result, not the rounding; the sanity check's float32 spot comparison on the
# dequantized cache is the precise one.
FP8_AGREEMENT = dict(out_rel=0.2, lse_atol=0.5)


def run_kv_dtypes(torch, fm, case, variants, meta, splits, kernel, args, ceil, sampler):
    """--kv-dtypes for one (case, kernel), in place of run_kernel: ``variants`` maps each KV dtype
    (args.dtype first: the baseline) to Inputs holding the same tokens (quantized for "fp8")
    and queries. run_variants: ratio = t(16-bit) / t(fp8) (> 1: the FP8 cache is faster), the
    FP8 output compared with the 16-bit one within FP8_AGREEMENT, in res["kv_dtypes"]["dtypes"];
    each dtype's GB/s and share of the copy ceiling count its own bytes (1 per FP8 element)."""
    fp8_q = bool(getattr(args, "fp8_q", False))

    def entry(name, inp):
        kv_bytes, q_bytes = ELEMENT_BYTES[name], (1 if name == "fp8" and fp8_q else 2)
        return dict(kv_dtype=name, fp8_q=name == "fp8" and fp8_q, bytes=case.bytes_for(kv_bytes, q_bytes))

    res = run_variants(torch, fm, case, variants, args.dtype, meta, splits, kernel, args, ceil, sampler,
                       "kv_dtypes", "dtypes", entry, lambda *outs: agreement(torch, *outs, **FP8_AGREEMENT))
    copy_gbps = (ceil.get("copy") or {}).get("gbps")
    for e in ((res.get("kv_dtypes") or {}).get("dtypes") or {}).values():
        if e.get("ms"):
            e["gbps"] = e["bytes"] / (e["ms"] * 1e-3) / 1e9
            if copy_gbps:
                e["pct_copy"] = 100.0 * e["gbps"] / copy_gbps
    return res


def _variant_problems(res, section, sub):
    """Variants of a --page-sizes / --kv-dtypes row that failed: error, sanity check, or
    disagreement with the baseline's output. [(key, short reason)]."""
    out = []
    for key, e in ((res.get(section) or {}).get(sub) or {}).items():
        if e.get("error"):
            out.append((key, "ERROR " + _first_line(e["error"], 40)))
        elif not (e.get("sanity") or {}).get("ok"):
            out.append((key, "FAIL " + "; ".join((e.get("sanity") or {}).get("problems", []))[:40]))
        elif e.get("agreement") and not e["agreement"].get("ok"):
            out.append((key, "DIFF " + "; ".join(e["agreement"].get("problems", []))[:40]))
    return out


def page_size_problems(res):
    """Page sizes of a --page-sizes row that failed: error, sanity check, or disagreement with
    the 64-token output. [(page, short reason)]."""
    return sorted((int(k), why) for k, why in _variant_problems(res, "page_sizes", "pages"))


def kv_dtype_problems(res):
    """KV dtypes of a --kv-dtypes row that failed: error, sanity check, or disagreement with the
    16-bit output. [(dtype, short reason)]."""
    return sorted(_variant_problems(res, "kv_dtypes", "dtypes"))


def row_failed(res):
    """Ours failed, its sanity check failed, the compared module disagreed with it, or (with
    --page-sizes / --kv-dtypes) a page size / KV dtype failed or disagreed with the baseline's
    output."""
    if res.get("error") or not (res.get("sanity") or {}).get("ok"):
        return True
    if page_size_problems(res) or kv_dtype_problems(res):
        return True
    a = (res.get("compare") or {}).get("agreement")
    return bool(a) and not a.get("ok")


def progress_line(case, res):
    r = res
    cmp = r.get("compare") or {}
    theirs = ""
    if cmp:
        theirs = (f"; theirs {fmt_time(cmp.get('ms'))}, ratio {fmt_ratio(cmp.get('ratio'))}, "
                  f"{agree_label(cmp)}")
    eager = ""
    if r.get("eager"):
        eager = (f"; eager wall {fmt_us(r['eager'].get('wall_us'))} host "
                 f"{fmt_us(r['eager'].get('host_us'))}")
        if cmp.get("eager"):
            eager += (f" (theirs {fmt_us(cmp['eager'].get('wall_us'))} / "
                      f"{fmt_us(cmp['eager'].get('host_us'))})")
    pages = ""
    ps = (r.get("page_sizes") or {}).get("pages") or {}
    if ps:
        pages = "; t(64)/t(page): " + ", ".join(
            f"{k} {fmt_ratio(e.get('ratio'))}" for k, e in sorted(ps.items(), key=lambda x: int(x[0]))
            if int(k) != PAGE)
        bad = page_size_problems(r)
        if bad:
            pages += " (" + "; ".join(f"{p}: {why}" for p, why in bad) + ")"
    dtypes = ""
    ds = (r.get("kv_dtypes") or {}).get("dtypes") or {}
    if ds:
        dtypes = "; " + ", ".join(
            f"t({next(iter(ds))})/t({k}) {fmt_ratio(e.get('ratio'))} ({fmt_num(e.get('gbps'), 0)} GB/s)"
            for k, e in list(ds.items())[1:])
        bad = kv_dtype_problems(r)
        if bad:
            dtypes += " (" + "; ".join(f"{k}: {why}" for k, why in bad) + ")"
    return (f"  {case.name} [{r['kernel']}]: {fmt_time(r.get('ms'))} (fastest "
            f"{fmt_time(r.get('ms_min'))}, burst {fmt_time(r.get('burst_ms'))}), "
            f"{fmt_num(r.get('tflops'), 1)} TFLOP/s, {fmt_num(r.get('gbps'), 0)} GB/s, SM MHz "
            f"{clock_label(r.get('clock'))}, {check_label(r)}{theirs}{eager}{pages}{dtypes}")


def run_gpu(args):
    try:
        import torch
    except ImportError as exc:
        print(f"bench_decode: cannot import torch: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device visible (use --dry-run to list the cases)",
              file=sys.stderr)
        return 2
    dev = torch.device("cuda", args.device if args.device is not None
                       else torch.cuda.current_device())
    torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    report = dict(tool="benchmarks/bench_decode.py", env=env_info(torch, dev),
                  settings=dict(seed=args.seed, dtype=args.dtype, pages=args.pages, reps=args.reps,
                                warmup=args.warmup, calls_per_graph=args.calls_per_graph or "auto",
                                cool_s=args.cool, quick=args.quick, burst=args.burst,
                                sweep=args.sweep, eager=args.eager, eager_calls=args.eager_calls,
                                replays_per_round=args.replays_per_round or "auto",
                                max_sets=args.max_sets, l2_factor=args.l2_factor, d=D, dv=DV,
                                page_block_size=args.page_size,
                                page_sizes=args.page_size_list, kv_dtype=args.kv_dtype,
                                fp8_q=args.fp8_q, kv_dtypes=args.kv_dtype_list),
                  formulas=dict(flops="b*h_q*s_q*mean_L*2*(d+dv)",
                                bytes="b*(mean_L*h_kv*d*kv + s_q*h_q*(d*qb + dv*2)), kv / qb: bytes "
                                      "of a cache / q element (2, 1 for FP8)",
                                time="median over graph replays of (replay time / calls per graph)",
                                ratio="t_theirs / t_ours, medians over interleaved rounds",
                                eager="wall: elapsed / calls between two synchronisations; host: "
                                      "median perf_counter time around one call"),
                  ref_note=REF_NOTE, kernels=args.kernels, ceilings={}, cases=[])
    fm = None
    try:
        import flash_mla as fm  # noqa: F811
        report["env"]["flash_mla"] = getattr(fm, "__version__", "?")
        report["env"]["flash_mla_path"] = os.path.dirname(getattr(fm, "__file__", "") or "")
        known = tuple(getattr(getattr(fm, "interface", None), "_KERNELS", None) or KNOWN_KERNELS)
        bad = [k for k in args.kernels if k not in known]
        if bad:
            print(f"bench_decode: unknown kernel(s) {bad}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 2
    except Exception as exc:  # noqa: BLE001 - still measure the ceilings
        report["env"]["flash_mla"] = None
        report["flash_mla_import_error"] = f"{type(exc).__name__}: {exc}"
        print(f"bench_decode: import flash_mla failed: {exc}", file=sys.stderr)
    other = None
    if args.compare:
        try:
            other = Compared(load_compare_module(args.compare))
        except Exception as exc:  # noqa: BLE001 - a usage error: nothing measured yet
            print(f"bench_decode: --compare: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        mod = other.module
        report["compare"] = dict(arg=args.compare, label=other.label, module=mod.__name__,
                                 file=getattr(mod, "__file__", None),
                                 version=getattr(mod, "__version__", None),
                                 metadata_seqlen_q=other.seqlen_q, page_block_size=PAGE)
        print(f"compare: {other.label} from {getattr(mod, '__file__', '?')}"
              + (" (get_mla_metadata given seqlen_q)" if other.seqlen_q else ""), flush=True)
    write_json(args.json, report)

    ceil = report["ceilings"]
    sampler = ClockSampler(dev.index)
    if not args.skip_ceilings:
        for name, fn in (("gemm", lambda: measure_gemm(torch, dev, args.gemm_n)),
                         ("copy", lambda: measure_copy(torch, dev, args.copy_gib))):
            try:
                t0 = time.perf_counter()
                ceil[name] = fn()
                ceil[name]["clock"] = sampler.window(t0, time.perf_counter())
            except Exception as exc:  # noqa: BLE001
                ceil[name] = dict(error=f"{type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
        print("ceilings: " + ", ".join(
            f"{k} " + (f"{v['tflops']:.0f} TFLOP/s" if "tflops" in v else
                       f"{v['gbps']:.0f} GB/s" if "gbps" in v else v.get("error", "?"))
            for k, v in ceil.items()), flush=True)
        write_json(args.json, report)

    l2 = report["env"]["l2_bytes"]
    for case in args.cases:
        entry = case.describe()
        entry["results"] = []
        report["cases"].append(entry)
        t0 = time.perf_counter()
        inp = meta = splits = variants = None
        try:
            if fm is None:
                raise RuntimeError("flash_mla not importable: "
                                   + report.get("flash_mla_import_error", ""))
            inp = Inputs(torch, case, args, dev, dtype, l2)
            if args.kv_dtype == "fp8":  # the same tokens, quantized; the 16-bit sets go
                inp = inp.to_fp8(torch, fm.kv_formats, args.fp8_q)
            entry.update(num_pages=inp.num_pages, n_sets=inp.n_sets, set_bytes=inp.set_bytes)
            meta, splits = fm.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv,
                                               case.h_kv)
            if args.page_size_list:  # the same tokens in every page size; one plan for all
                variants = {p: inp.with_page(torch, case, args, dev, p) for p in args.page_size_list}
                entry["num_pages_by_page_size"] = {str(p): v.num_pages for p, v in variants.items()}
            if args.kv_dtype_list:  # the 16-bit inputs and their FP8 quantization
                variants = {args.dtype: inp}
                if "fp8" in args.kv_dtype_list:
                    variants["fp8"] = inp.to_fp8(torch, fm.kv_formats, args.fp8_q)
            torch.cuda.synchronize()
            setup_err = None
        except Exception as exc:  # noqa: BLE001
            setup_err = f"setup: {type(exc).__name__}: {exc}"
        if other is not None and setup_err is None:
            # FlashMLA takes 64-token pages only: give it the same cache in 64-token pages.
            other.prepare(torch, case, inp.with_page(torch, case, args, dev, PAGE))
        for kernel in args.kernels:
            if setup_err:
                entry["results"].append(dict(kernel=kernel, error=setup_err))
                continue
            try:
                if variants and args.kv_dtype_list:
                    res = run_kv_dtypes(torch, fm, case, variants, meta, splits, kernel, args,
                                        ceil, sampler)
                elif variants:
                    res = run_page_sizes(torch, fm, case, variants, meta, splits, kernel, args,
                                         ceil, sampler)
                else:
                    res = run_kernel(torch, fm, case, inp, meta, splits, kernel, args, ceil,
                                     sampler, other)
            except Exception as exc:  # noqa: BLE001
                res = dict(kernel=kernel, error=f"{type(exc).__name__}: {exc}")
                _sync_quietly(torch)
            entry["results"].append(res)
            print(progress_line(case, res), flush=True)
        entry["wall_s"] = time.perf_counter() - t0
        if other is not None:
            other.release()
        del inp, meta, splits, variants
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
        write_json(args.json, report)

    sampler.close()
    if other is not None:
        report["compare_summary"] = compare_summary(report)
    if args.page_size_list:
        report["page_size_summary"] = page_size_summary(report)
    if args.kv_dtype_list:
        report["kv_dtype_summary"] = kv_dtype_summary(report)
    print()
    print(format_report(report))
    if args.png:
        msg = write_png(report, args.png)
        report["png"] = msg
        print(msg)
    line = summary_line(report, args.json)
    report["summary"] = line
    write_json(args.json, report)
    print(line)
    failed = any(row_failed(r) for _, r in result_pairs(report))
    return 1 if failed or fm is None else 0


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
