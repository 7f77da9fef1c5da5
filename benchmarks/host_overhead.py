"""Host cost of one eager flash_mla_with_kvcache call: the direct path against the custom-op path.

For each case (default: b=1 h_q=128 and b=32 h_q=16, s_q=1, h_kv=1, L=1024, bf16) and each
path ("direct": eager calls straight into the compiled module; "custom_op": the same calls
through torch.library dispatch, as before the direct path existed), it prints:

* host us/call: time.perf_counter() around each call, median (and p10 / p90) over --calls
  calls, with a torch.cuda.synchronize() every --sync-every calls so the GPU queue stays short
  (the launch never waits for a full queue: this is the CPU cost of the call);
* wall us/call: --calls plain back-to-back calls between two synchronisations, divided by the
  count (what a Python decode loop without CUDA graphs gets: max(host, GPU) per call, roughly);
* GPU us/call: the same call replayed from a CUDA graph (no host work), for comparison;
* get_mla_metadata host us/call, for both paths.

    python benchmarks/host_overhead.py [--calls 2000] [--sync-every 50] [--json out.json]

Without a CUDA GPU it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


def make_case(torch, b, h_q, seqlen, s_q=1, h_kv=1, dtype=None, seed=0):
    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    pages = -(-seqlen // 64)
    q = torch.randn((b, s_q, h_q, 576), generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    k_cache = torch.randn((b * pages, 64, h_kv, 576), generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    perm = torch.randperm(b * pages, generator=gen, device="cuda").to(torch.int32)
    block_table = perm.reshape(b, pages).contiguous()
    cache_seqlens = torch.full((b,), seqlen, dtype=torch.int32, device="cuda")
    return q, k_cache, block_table, cache_seqlens


def host_times(torch, fn, calls, sync_every):
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if (i + 1) % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    us = [t * 1e6 for t in times]
    return dict(median=statistics.median(us), p10=_percentile(us, 0.1), p90=_percentile(us, 0.9))


def wall_time(torch, fn, calls):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def graph_time(torch, fn, replays=50, per_graph=20):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * per_graph)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement (default 2000)")
    parser.add_argument("--sync-every", type=int, default=50, help="host timing: synchronise every N calls")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--cases", default="1x128,32x16", help="comma-separated BxH_Q (s_q=1, h_kv=1)")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("host_overhead: torch is not installed; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("host_overhead: no CUDA GPU available; skipped (this benchmark needs one)")
        return 0

    import flash_mla
    from flash_mla import _torch_ops, flash_mla_with_kvcache, get_mla_metadata

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"kernel {flash_mla.kernel_for_device()}, flash-mla {getattr(flash_mla, '__version__', '?')}")
    print(f"{args.calls} calls per figure; host figures synchronise every {args.sync_every} calls\n")
    header = (f"{'case':>16} {'path':>10} {'host us/call':>22} {'wall us/call':>13} {'GPU us/call':>12} "
              f"{'metadata host us':>17}")
    print(header)
    print("-" * len(header))

    results = []
    saved = _torch_ops.DIRECT_EAGER
    try:
        for spec in args.cases.split(","):
            b, h_q = (int(x) for x in spec.lower().split("x"))
            q, k_cache, block_table, cache_seqlens = make_case(torch, b, h_q, args.seqlen)
            meta, splits = get_mla_metadata(cache_seqlens, h_q, 1)
            scale = 1.0 / math.sqrt(576)

            def decode():
                return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, meta, splits,
                                              softmax_scale=scale, causal=False)

            def metadata():
                return get_mla_metadata(cache_seqlens, h_q, 1)

            for path in ("direct", "custom_op"):
                _torch_ops.DIRECT_EAGER = path == "direct"
                for _ in range(args.warmup):
                    decode()
                    metadata()
                torch.cuda.synchronize()
                host = host_times(torch, decode, args.calls, args.sync_every)
                wall = wall_time(torch, decode, args.calls)
                meta_host = host_times(torch, metadata, args.calls, args.sync_every)
                gpu = graph_time(torch, decode)
                row = dict(case=f"b={b} h_q={h_q} L={args.seqlen}", path=path, host_us=host, wall_us=wall,
                           gpu_us=gpu, metadata_host_us=meta_host)
                results.append(row)
                host_s = f"{host['median']:.1f} ({host['p10']:.1f}-{host['p90']:.1f})"
                print(f"{row['case']:>16} {path:>10} {host_s:>22} {wall:>13.1f} {gpu:>12.1f} "
                      f"{meta_host['median']:>17.1f}")
    finally:
        _torch_ops.DIRECT_EAGER = saved

    print("\nhost: median (p10-p90) of perf_counter around each call; wall: back-to-back calls; "
          "GPU: CUDA-graph replays of the same call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, torch=torch.__version__, calls=args.calls,
                           sync_every=args.sync_every, results=results), f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
