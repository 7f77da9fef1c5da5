#!/usr/bin/env python3
"""A small decode workload for compute-sanitizer (run by scripts/sanitize.sh).

Python under compute-sanitizer is slow, so this driver keeps GPU work to flash-mla's own
kernels: problems are built on the CPU (conftest.build_paged_case: NaN in unused cache slots
and pages, junk past each request's pages in block_table, strided layouts) and copied to the
GPU storage-for-storage (same strides and offsets, memcpy only); references are computed on the
CPU. With PYTORCH_NO_CUDA_MEMORY_CACHING=1 (set by sanitize.sh) every tensor is its own
cudaMalloc, so memcheck sees any access past a tensor's end.

Cases (--cases, default all):
  split    b=3, s_q=1, h_q=16, lengths 1/1300/0: a request split across SM parts (combine runs)
  gqa      b=2, s_q=2, h_q=64, h_kv=2, causal, q stored (b, h, s, d)
  wide     b=2, s_q=1, h_q=128: two m-blocks of 64 rows, a k_cache with padded rows
  hostile  lengths past the block table and junk page indices among the used entries: results
           are meaningless but nothing may be read out of bounds (memcheck), and
           check_inputs=True must refuse the call
  page16   b=3, s_q=1, h_q=16, 16-token pages (a 64-token tile spans four pages), one split request
  page256  b=2, s_q=2, h_q=32, causal, 256-token pages (a tile is a slice of a page)
  fp8      b=4, s_q=1, h_q=16, an FP8 cache (bf16 q) in 16-token pages, one split request; NaN
           codes (0x7f / 0xff) in every unused slot and page
  fp8q     b=2, s_q=2, h_q=32, causal, FP8 q and FP8 cache in 128-token pages, q stored with
           NaN-code heads around it
  sparse_v32     token-sparse decode, V3.2 FP8 cache (61-token pages, padded page stride), b=2,
                 s_q=2, h_q=16, topk 100 with -1, negative, too-large and duplicate indices and a
                 topk_length cut; every unselected slot is NaN bytes
  sparse_model1  token-sparse decode, 512-dim FP8 cache and a second cache of another page size,
                 b=2, s_q=1, h_q=33, an attention sink
  sparse_bf16    token-sparse decode, bf16 cache of 576 channels, one long row (topk 1500: a
                 query token split across SM parts), NaN in every unselected slot
FP8 cases are quantized on the CPU (conftest.quantize_case_fp8) and their references computed
on the dequantized values; the descales travel to the GPU as (1,) float32 tensors (their own
allocations: memcheck sees a read past their 4 bytes).
Each case runs with get_mla_metadata and every kernel that runs here (--kernels), through the
torch API once with check_inputs=True (the input-check kernels) and once into preallocated
out= / lse=. With --num-sms N it goes through flash_mla.ops instead, planning for N SMs (N SM
parts for 64 query rows: far fewer CTAs, which is what makes racecheck affordable), one
ops.check_paged_inputs and one ops.mla_decode per kernel.

Exit status 0 when every result matched the reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "python"))

import torch  # noqa: E402

import flash_mla  # noqa: E402
from conftest import assert_decode_matches, build_paged_case, quantize_case_fp8  # noqa: E402
from flash_mla import ops  # noqa: E402
from flash_mla.reference import mla_decode_reference  # noqa: E402

DV = 512
KERNELS = ("auto", "sm80_large", "sm80_small", "sm90")
CASES = {
    # name: (b, s_q, h_q, h_kv, lengths, dtype, q_layout, k_layout, causal, table_width, page)
    "split": (3, 1, 16, 1, [1, 1300, 0], torch.bfloat16, "head_pad", "row_pad", False, None, 64),
    "gqa": (2, 2, 64, 2, [65, 300], torch.float16, "bhsd", "contiguous", True, None, 64),
    "wide": (2, 1, 128, 1, [700, 64], torch.bfloat16, "contiguous", "row_pad", True, None, 64),
    "hostile": (3, 2, 16, 1, [100, 64, 10], torch.bfloat16, "contiguous", "head_pad", True, 3, 64),
    "page16": (3, 1, 16, 1, [1, 700, 33], torch.bfloat16, "contiguous", "row_pad", False, None, 16),
    "page256": (2, 2, 32, 1, [300, 1000], torch.float16, "contiguous", "contiguous", True, None, 256),
    "fp8": (4, 1, 16, 1, [1, 1300, 0, 45], torch.bfloat16, "contiguous", "contiguous", False, None, 16),
    "fp8q": (2, 2, 32, 1, [300, 1000], torch.bfloat16, "head_pad", "contiguous", True, None, 128),
}
# Token-sparse cases: name -> (format, b, s_q, h_q, topk, page, page padding bytes, extra cache
# (topk, page) or None, topk_length or None, sink).
SPARSE_CASES = {
    "sparse_v32": ("v32", 2, 2, 16, 100, 61, 16 * 3, None, [100, 57], False),
    "sparse_model1": ("model1", 2, 1, 33, 40, 64, 0, (24, 2), None, True),
    "sparse_bf16": ("bf16", 1, 1, 16, 1500, 64, 0, None, None, False),
}
# FP8 cases: name -> q in FP8 too (the cache always is). Their out is bfloat16 (the base dtype).
FP8_CASES = {"fp8": False, "fp8q": True}


def to_gpu(t: torch.Tensor) -> torch.Tensor:
    """The same view (shape, strides, offset) over a GPU copy of t's whole storage."""
    storage = t.untyped_storage().cuda()
    return torch.empty((0,), dtype=t.dtype, device="cuda").set_(storage, t.storage_offset(), t.size(), t.stride())


def gpu_nan(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype).cuda()  # filled on the CPU: no fill kernel


def runnable_kernels():
    """Every kernel that runs here, once each ("auto" stands for the kernel it resolves to)."""
    seen, kernels = set(), []
    for kernel in KERNELS:
        try:
            resolved = flash_mla.kernel_for_device(kernel=kernel)
        except (RuntimeError, ValueError):
            continue
        if resolved not in seen:
            seen.add(resolved)
            kernels.append(kernel)
    return kernels


def case_inputs(name: str):
    """The case built on the CPU, its GPU inputs (q, k_cache, block_table, cache_seqlens), the
    descale keyword arguments on the GPU (none for 16-bit cases) and the reference's inputs on
    the CPU (q, k_cache: the dequantized values for FP8 cases); the "hostile" case's table and
    lengths are then broken: request 0 claims 300 tokens (3 columns hold 192: pages past the
    table), request 1 has junk in a used entry, request 2 a negative page in its only entry."""
    b, s_q, h_q, h_kv, lengths, dtype, q_layout, k_layout, causal, width, page = CASES[name]
    seed = 1234 + len(name)
    cpu = build_paged_case(b, s_q, h_q, h_kv, lengths, dtype, seed=seed, device="cpu",
                           q_layout=q_layout, k_layout=k_layout, table_width=width, page=page)
    block_table_cpu, seqlens_cpu = cpu.block_table.clone(), cpu.cache_seqlens.clone()
    if name == "hostile":
        seqlens_cpu[0] = 300
        block_table_cpu[1, 0] = 10 ** 9
        block_table_cpu[2, 0] = -7
    q, k_cache, descales, ref_inputs = cpu.q, cpu.k_cache, {}, (cpu.q, cpu.k_cache)
    if name in FP8_CASES:
        fp8 = quantize_case_fp8(cpu, fp8_q=FP8_CASES[name], seed=seed)
        q, k_cache, ref_inputs = fp8.q, fp8.k_cache, fp8.reference_inputs()
        descales = {key: value.cuda() for key, value in fp8.descales().items()}
    gpu = (to_gpu(q), to_gpu(k_cache), block_table_cpu.cuda(), seqlens_cpu.cuda())
    return cpu, gpu, descales, ref_inputs


def run_case_ops(name: str, kernels, num_sms: int, log) -> bool:
    """The flash_mla.ops path with a plan for `num_sms` SMs (few CTAs)."""
    cpu, (q, k_cache, block_table, cache_seqlens), descales, (q_ref, k_ref) = case_inputs(name)
    b, s_q, h_q, h_kv, _, dtype, _, _, causal, _, page = CASES[name]
    parts = ops.num_sm_parts(s_q, h_q, h_kv, num_sms=num_sms)
    shapes = ops.workspace_shapes(b, s_q, h_q, h_kv, parts)
    meta = torch.zeros(shapes["tile_scheduler_metadata"], dtype=torch.int32).cuda()
    splits = torch.zeros(shapes["num_splits"], dtype=torch.int32).cuda()
    stream = torch.cuda.current_stream()
    ops.get_mla_metadata(cache_seqlens, meta, splits, stream=stream)
    result = torch.zeros((ops.INPUT_CHECK_WORDS,), dtype=torch.int64).cuda()
    ops.check_paged_inputs(block_table, cache_seqlens, cpu.num_blocks, result, stream=stream, page_size=page)
    verdict = ops.input_check_error(result.tolist(), cpu.num_blocks, block_table.shape[1], page_size=page)
    ok = (verdict is not None) == (name == "hostile")
    log(f"  {name:8s} check_paged_inputs: {verdict or 'valid'}{'' if ok else '  <- FAIL'}")
    if name != "hostile":
        ref_out, ref_lse = mla_decode_reference(q_ref, k_ref, cpu.block_table, cpu.cache_seqlens, DV, None,
                                                causal)
    for kernel in kernels:
        t0 = time.time()
        try:
            out, lse = gpu_nan(shapes["out"], dtype), gpu_nan(shapes["lse"], torch.float32)
            o_accum = gpu_nan(shapes["o_accum"], torch.float32)
            lse_accum = gpu_nan(shapes["lse_accum"], torch.float32)
            ops.mla_decode(q, k_cache, block_table, cache_seqlens, meta, splits, out, lse, o_accum, lse_accum,
                           causal=causal, stream=stream, kernel=kernel, **descales)
            torch.cuda.synchronize()
            if name == "hostile":
                log(f"  {name:8s} {kernel:11s} ran (results not checked)")
                continue
            assert_decode_matches(out.cpu(), lse.cpu(), ref_out, ref_lse, dtype, what=f"{name} {kernel} ops")
            log(f"  {name:8s} {kernel:11s} ok, {parts} SM parts ({time.time() - t0:.1f} s)")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next kernel
            log(f"  {name:8s} {kernel:11s} FAIL: {type(exc).__name__}: {exc}")
            ok = False
    return ok


def run_case(name: str, kernels, log) -> bool:
    cpu, (q, k_cache, block_table, cache_seqlens), descales, (q_ref, k_ref) = case_inputs(name)
    _, s_q, h_q, h_kv, _, dtype, _, _, causal, _, _ = CASES[name]
    ok = True
    if name != "hostile":
        ref_out, ref_lse = mla_decode_reference(q_ref, k_ref, cpu.block_table, cpu.cache_seqlens, DV, None,
                                                causal)
    meta, splits = flash_mla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    for kernel in kernels:
        t0 = time.time()
        try:
            if name == "hostile":
                out, lse = flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                                            causal=causal, kernel=kernel)
                torch.cuda.synchronize()
                finite = bool(torch.isfinite(out.cpu().float()).all())
                log(f"  {name:8s} {kernel:11s} ran (results not checked), out finite: {finite}")
                try:
                    flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                                     causal=causal, kernel=kernel, check_inputs=True)
                except ValueError as exc:
                    log(f"  {name:8s} {kernel:11s} check_inputs refused it: {str(exc)[:90]}")
                else:
                    log(f"  {name:8s} {kernel:11s} FAIL: check_inputs accepted invalid indices")
                    ok = False
                continue
            out, lse = flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                                        causal=causal, kernel=kernel, check_inputs=True,
                                                        **descales)
            assert_decode_matches(out.cpu(), lse.cpu(), ref_out, ref_lse, dtype, what=f"{name} {kernel}")
            out_buf, lse_buf = gpu_nan(out.shape, dtype), gpu_nan(lse.shape, torch.float32)
            flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                             causal=causal, kernel=kernel, out=out_buf, lse=lse_buf, **descales)
            assert_decode_matches(out_buf.cpu(), lse_buf.cpu(), ref_out, ref_lse, dtype, what=f"{name} {kernel} out=")
            log(f"  {name:8s} {kernel:11s} ok ({time.time() - t0:.1f} s)")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next kernel
            log(f"  {name:8s} {kernel:11s} FAIL: {type(exc).__name__}: {exc}")
            ok = False
    return ok


def _sparse_cache(fmt: str, num_blocks: int, page: int, pad: int, selected: torch.Tensor, gen):
    """A token-sparse cache on the CPU (num_blocks x page tokens) whose slots outside `selected`
    (flat token ids) are NaN: bf16 NaN, or 0xff bytes (e4m3 NaN, NaN scales) in the FP8 records.
    Returns (the cache as the kernel takes it, its dequantized float32 values)."""
    from flash_mla import kv_formats
    d = 512 if fmt == "model1" else 576
    values = (torch.randn((num_blocks, page, 1, d), generator=gen) * 0.5).to(torch.bfloat16)
    unused = torch.ones(num_blocks * page, dtype=torch.bool)
    unused[selected[(selected >= 0) & (selected < num_blocks * page)].long()] = False
    unused = unused.view(num_blocks, page)
    if fmt == "bf16":
        cache = values.clone()
        cache[unused] = float("nan")
        return cache, values.float()
    if fmt == "v32":
        stride = page * 656 + pad
        cache = kv_formats.quantize_kv_cache_v32(values, page_stride=stride)
        deq = kv_formats.dequantize_kv_cache_v32(cache)
        cache[unused] = 0xff
        return cache, deq
    cache = kv_formats.quantize_kv_cache_model1(values)
    deq = kv_formats.dequantize_kv_cache_model1(cache)
    data, scales = kv_formats._model1_regions(cache)
    data[unused] = 0xff
    scales[unused] = 0xff
    return cache, deq


def run_sparse_case(name: str, kernels, log) -> bool:
    """A token-sparse case through the torch API (every kernel that takes its format), into new and into
    NaN-filled preallocated outputs, against the float reference on the dequantized cache."""
    from flash_mla.sparse_reference import sparse_decode_reference
    fmt, b, s_q, h_q, topk, page, pad, extra, lengths, with_sink = SPARSE_CASES[name]
    gen = torch.Generator().manual_seed(4321 + len(name))
    d = 512 if fmt == "model1" else 576

    def indices_for(k, num_blocks, pg):
        cap = num_blocks * pg
        idx = torch.randint(0, cap, (b, s_q, k), generator=gen, dtype=torch.int32)
        flat = idx.view(-1)
        junk = [-1, -5, cap, cap + 7, 2 ** 31 - 1, -(2 ** 31)]
        for pos, value in zip(range(0, flat.numel(), max(1, flat.numel() // 12)), junk):
            flat[pos] = value
        if flat.numel() > 3:
            flat[1] = flat[2]  # a duplicate
        return idx

    num_blocks = (b * s_q * topk) // page + 2
    idx = indices_for(topk, num_blocks, page)
    cache, deq = _sparse_cache(fmt, num_blocks, page, pad, idx.view(-1), gen)
    kwargs, ref_kwargs = {}, {}
    if extra is not None:
        e_topk, e_page = extra
        e_blocks = (b * s_q * e_topk) // e_page + 2
        e_idx = indices_for(e_topk, e_blocks, e_page)
        e_cache, e_deq = _sparse_cache(fmt, e_blocks, e_page, 0, e_idx.view(-1), gen)
        kwargs.update(extra_k_cache=to_gpu(e_cache), extra_indices_in_kvcache=e_idx.cuda())
        ref_kwargs.update(extra_kv=e_deq, extra_indices=e_idx)
    if lengths is not None:
        tl = torch.tensor(lengths, dtype=torch.int32)
        kwargs["topk_length"] = tl.cuda()
        ref_kwargs["topk_length"] = tl
    if with_sink:
        sink = torch.randn((h_q,), generator=gen)
        sink[0], sink[1] = float("inf"), float("-inf")
        kwargs["attn_sink"] = sink.cuda()
        ref_kwargs["attn_sink"] = sink
    q = (torch.randn((b, s_q, h_q, d), generator=gen)).to(torch.bfloat16)
    scale = 1.0 / d ** 0.5
    ref_out, ref_lse = sparse_decode_reference(q, deq, idx, softmax_scale=scale, **ref_kwargs)
    q_gpu, cache_gpu, idx_gpu = to_gpu(q), to_gpu(cache), idx.cuda()
    ok = True
    for kernel in kernels:
        if kernel == "sm90" and fmt == "model1":
            continue  # the Hopper token-sparse kernel takes the V3.2 format and 576-channel bf16 caches
        t0 = time.time()
        try:
            sched, _ = flash_mla.get_mla_metadata()
            out, lse = flash_mla.flash_mla_with_kvcache(q_gpu, cache_gpu, None, None, DV, sched, None, scale, False,
                                                        fmt != "bf16", idx_gpu, kernel=kernel, **kwargs)
            assert_decode_matches(out.cpu(), lse.cpu(), ref_out, ref_lse, torch.bfloat16, what=f"{name} {kernel}")
            out_buf = gpu_nan(out.shape, torch.bfloat16)
            lse_buf = gpu_nan((b, s_q, h_q), torch.float32).transpose(1, 2)
            flash_mla.flash_mla_with_kvcache(q_gpu, cache_gpu, None, None, DV, sched, None, scale, False,
                                             fmt != "bf16", idx_gpu, kernel=kernel, out=out_buf, lse=lse_buf, **kwargs)
            assert_decode_matches(out_buf.cpu(), lse_buf.cpu(), ref_out, ref_lse, torch.bfloat16,
                                  what=f"{name} {kernel} out=")
            log(f"  {name:8s} {kernel:11s} ok ({time.time() - t0:.1f} s)")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next kernel
            log(f"  {name:8s} {kernel:11s} FAIL: {type(exc).__name__}: {exc}")
            ok = False
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    all_cases = [*CASES, *SPARSE_CASES]
    parser.add_argument("--cases", default=",".join(all_cases), help="comma-separated subset of " + ",".join(all_cases))
    parser.add_argument("--kernels", default="all", help="comma-separated kernel names, or 'all' (those that run)")
    parser.add_argument("--num-sms", type=int, default=None,
                        help="use flash_mla.ops with a plan for this many SMs (fewer CTAs) instead of the torch API")
    args = parser.parse_args(argv)

    def log(msg):
        print(f"sanitize_driver: {msg}", flush=True)

    if not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    kernels = runnable_kernels() if args.kernels == "all" else args.kernels.split(",")
    log(f"device {torch.cuda.get_device_name()}, kernels {kernels}, caching allocator "
        f"{'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'ON'}")
    ok = True
    for name in args.cases.split(","):
        if name in SPARSE_CASES:  # the torch API (flash_mla.ops has no token-sparse form)
            ok &= run_sparse_case(name, kernels, log)
        elif args.num_sms:
            ok &= run_case_ops(name, kernels, args.num_sms, log)
        else:
            ok &= run_case(name, kernels, log)
    torch.cuda.synchronize()
    log("all cases passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
