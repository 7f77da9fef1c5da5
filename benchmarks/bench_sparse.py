"""Token-sparse decode benchmark: time per call (CUDA-graph replay), TFLOP/s, GB/s and the share
of the GPU's ceilings measured in the same run (copy bandwidth, bf16 GEMM).

    python benchmarks/bench_sparse.py [--quick] [--json PATH] [--rows NAME,...] [--kernels auto,sm80_small]
                                      [--compare MODULE_OR_PATH]

Each row draws a fresh cache of 2 * topk tokens per request (pages of the row's size) in the
row's format, random valid indices (duplicates possible), and checks the output against the
float reference on one (request, query token) before timing. FLOPs count 2 * h_q * keys *
(d_qk + 512) per query token; bytes count every selected token's record once per query token
(the bytes the kernel requests; repeated tokens may hit in L2).

--compare times another module with the same API (a FlashMLA build: the later releases'
positional call with a scheduler object) on the identical inputs, interleaved with ours (the two
CUDA graphs replayed alternately), checks that both outputs agree, and adds its time and the
ratio t(other) / t(ours) (> 1: we are faster). Rows it cannot run (its kernels take only some
head counts and formats) show its error instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import _median, env_info, load_compare_module, measure_copy, measure_gemm, time_events  # noqa: E402

import flash_mla  # noqa: E402
from flash_mla import kv_formats  # noqa: E402
from flash_mla.sparse_reference import sparse_decode_reference  # noqa: E402

# name: (format, b, s_q, h_q, topk, page, extra_topk)
ROWS = {
    "v32-b64-h128-s2-k2048": ("v32", 64, 2, 128, 2048, 64, 0),
    "v32-b74-h128-s2-k2048": ("v32", 74, 2, 128, 2048, 64, 0),
    "v32-b128-h128-s2-k2048": ("v32", 128, 2, 128, 2048, 64, 0),
    "v32-b148-h128-s2-k16384": ("v32", 148, 2, 128, 16384, 64, 0),
    "v32-b148-h64-s2-k16384": ("v32", 148, 2, 64, 16384, 64, 0),
    "v32-b128-h64-s1-k2048": ("v32", 128, 1, 64, 2048, 64, 0),
    "v32-b128-h32-s2-k2048": ("v32", 128, 2, 32, 2048, 64, 0),
    "v32-b128-h16-s2-k2048": ("v32", 128, 2, 16, 2048, 64, 0),
    "model1-b64-h64-s2-k2048+512": ("model1", 64, 2, 64, 2048, 64, 512),
    "bf16-b128-h128-s2-k2048": ("bf16", 128, 2, 128, 2048, 64, 0),
    "bf16-b128-h16-s2-k2048": ("bf16", 128, 2, 16, 2048, 64, 0),
}
QUICK = ["v32-b64-h128-s2-k2048", "v32-b128-h128-s2-k2048", "v32-b128-h64-s1-k2048", "v32-b128-h16-s2-k2048",
         "model1-b64-h64-s2-k2048+512", "bf16-b128-h128-s2-k2048"]
RECORD_BYTES = {"v32": 656, "model1": 584, "bf16": None}  # bf16: 2 * d_qk


def make_cache(fmt, num_blocks, page, gen, dev):
    d = 512 if fmt == "model1" else 576
    dense = (torch.randn((num_blocks, page, 1, d), generator=gen, device=dev) * 0.5).to(torch.bfloat16)
    if fmt == "v32":
        return kv_formats.quantize_kv_cache_v32(dense), d
    if fmt == "model1":
        return kv_formats.quantize_kv_cache_model1(dense), d
    return dense, d


def make_indices(b, s_q, topk, tokens_per_req, gen, dev):
    base = (torch.arange(b, device=dev, dtype=torch.int64) * tokens_per_req).view(b, 1, 1)
    pick = torch.randint(0, tokens_per_req, (b, s_q, topk), generator=gen, device=dev)
    return (base + pick).to(torch.int32)


def capture(fn):
    """fn() captured in a CUDA graph (after one warm-up call on the capture stream)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            result = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, result


def time_interleaved(graphs, reps, warmup=5):
    """Per-graph median replay time in ms, the graphs replayed alternately."""
    times = [[] for _ in graphs]
    for _ in range(warmup):
        for g in graphs:
            g.replay()
    torch.cuda.synchronize()
    for _ in range(reps):
        for i, g in enumerate(graphs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            times[i].append((start, end))
    torch.cuda.synchronize()
    return [_median([s.elapsed_time(e) for s, e in t]) for t in times]


def run_row(name, spec, reps, dev, seed, kernel="auto", other=None):
    fmt, b, s_q, h_q, topk, page, extra_topk = spec
    gen = torch.Generator(device=dev).manual_seed(seed)
    tokens = 2 * max(topk, 1)
    num_blocks = b * tokens // page
    cache, d = make_cache(fmt, num_blocks, page, gen, dev)
    q = (torch.randn((b, s_q, h_q, d), generator=gen, device=dev)).to(torch.bfloat16)
    indices = make_indices(b, s_q, topk, tokens, gen, dev)
    extra = {}
    if extra_topk:
        e_tokens = 2 * extra_topk
        e_cache, _ = make_cache(fmt, b * e_tokens // page, page, gen, dev)
        extra = dict(extra_k_cache=e_cache, extra_indices_in_kvcache=make_indices(b, s_q, extra_topk, e_tokens, gen, dev))
    is_fp8 = fmt != "bf16"
    if is_fp8:  # FP8 records as float8_e4m3fn (what FlashMLA's own tests pass)
        cache = cache.view(torch.float8_e4m3fn)
        if extra:
            extra["extra_k_cache"] = extra["extra_k_cache"].view(torch.float8_e4m3fn)
    sched, _ = flash_mla.get_mla_metadata()

    def call():
        return flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, sched, None, None, False, is_fp8, indices,
                                                kernel=kernel, **extra)

    out, lse = call()
    # Check one (request, query token) against the float reference on the dequantized cache.
    i = b // 2
    deq = kv_formats.dequantize_sparse_kv_cache(cache)
    ref_kw = {}
    if extra:
        ref_kw = dict(extra_kv=kv_formats.dequantize_sparse_kv_cache(extra["extra_k_cache"]),
                      extra_indices=extra["extra_indices_in_kvcache"][i:i + 1])
    ref_out, ref_lse = sparse_decode_reference(q[i:i + 1], deq, indices[i:i + 1], **ref_kw)
    err = (out[i:i + 1].float() - ref_out).abs().max().item()
    lse_err = (lse[i:i + 1] - ref_lse).abs().max().item()
    del deq
    graph, (g_out, _) = capture(call)
    other_result = {}
    if other is not None:
        try:
            other_sched, _ = other.get_mla_metadata()
            scale = 1.0 / math.sqrt(d)

            def other_call():
                return other.flash_mla_with_kvcache(
                    q, cache, None, None, 512, other_sched, None, scale, False, is_fp8, indices, None,
                    extra.get("extra_k_cache"), extra.get("extra_indices_in_kvcache"), None, None)

            o_out, _ = other_call()
            other_graph, (og_out, _) = capture(other_call)
            ms, other_ms = time_interleaved([graph, other_graph], reps)
            other_result = dict(other_us=other_ms * 1e3, ratio=other_ms / ms,
                                other_max_diff=(og_out.float() - g_out.float()).abs().max().item())
        except Exception as exc:  # noqa: BLE001 - e.g. a head count or format it has no kernel for
            other_result = dict(other_error=f"{type(exc).__name__}: {str(exc)[:80]}")
            ms = _median(time_events(torch, graph.replay, reps, 5))
    else:
        ms = _median(time_events(torch, graph.replay, reps, 5))
    keys = topk + extra_topk
    flops = 2.0 * b * s_q * h_q * keys * (d + 512)
    record = RECORD_BYTES[fmt] or 2 * d
    nbytes = b * s_q * keys * record
    return dict(name=name, kernel=kernel, format=fmt, b=b, s_q=s_q, h_q=h_q, topk=topk, extra_topk=extra_topk, page=page,
                us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12, gbps=nbytes / (ms * 1e-3) / 1e9,
                max_abs_err=err, max_lse_err=lse_err, **other_result)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset of the rows")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--kernels", default="auto", help="comma-separated kernels to time each row with")
    ap.add_argument("--compare", default="", help="a module (name, package directory or .py file) with the same "
                    "API to time on the same inputs, interleaved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the results to this file")
    args = ap.parse_args(argv)
    names = [n for n in args.rows.split(",") if n] or (QUICK if args.quick else list(ROWS))
    for n in names:
        if n not in ROWS:
            ap.error(f"unknown row {n!r}; rows: {', '.join(ROWS)}")
    other = load_compare_module(args.compare) if args.compare else None
    dev = torch.device("cuda", torch.cuda.current_device())
    copy = measure_copy(torch, dev, 2.0)
    gemm = measure_gemm(torch, dev, 8192)
    rows = []
    print(f"{'row':32} {'kernel':>10} {'us':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%GEMM':>6} {'%copy':>6} {'max err':>8}")
    for n in names:
        for kernel in args.kernels.split(","):
            r = run_row(n, ROWS[n], args.reps, dev, args.seed, kernel, other)
            r["gemm_share"] = r["tflops"] / gemm["tflops"]
            r["copy_share"] = r["gbps"] / copy["gbps"]
            rows.append(r)
            print(f"{n:32} {kernel:>10} {r['us']:9.1f} {r['tflops']:8.1f} {r['gbps']:7.0f} "
                  f"{100 * r['gemm_share']:5.0f}% {100 * r['copy_share']:5.0f}% {r['max_abs_err']:8.1e}"
                  + (f"  other {r['other_us']:9.1f} us  ratio {r['ratio']:.2f}x  diff {r['other_max_diff']:.1e}"
                     if "ratio" in r else f"  other: {r['other_error']}" if "other_error" in r else ""), flush=True)
    print(f"ceilings of this run: copy {copy['gbps']:.0f} GB/s, bf16 GEMM {gemm['tflops']:.0f} TFLOP/s "
          f"({env_info(torch, dev)['gpu_name']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env_info(torch, dev), copy=copy, gemm=gemm, rows=rows), f, indent=1)
    bad = [r["name"] for r in rows if not (r["max_abs_err"] < 5e-2 and math.isfinite(r["max_lse_err"]))]
    if bad:
        print("output check failed: " + ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
