"""``python -m flash_mla``: what a bug report needs, and a one-command demo on a GPU.

    python -m flash_mla            version, build (CUDA, architectures, CUTLASS), torch, the GPUs
                                   and the kernel ``kernel="auto"`` picks on each
    python -m flash_mla --demo     one decode on the GPU: checked against flash_mla.reference,
                                   then timed (add --help for its shape options)

Works without a GPU (it says none was found) and without torch (it says so).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time


def _build_lines() -> list:
    try:
        from . import _build_info as info
    except ImportError:
        return ["build:    no build information (flash_mla/_build_info.py is written by the CMake "
                "build; this copy was not installed with pip)"]
    ptx = [f.split("code=")[-1] for f in info.gencode_flags if "code=compute_" in f]
    sass = [f.split("code=")[-1] for f in info.gencode_flags if "code=sm_" in f]
    return [
        f"build:    CUDA {info.cuda_version}, architectures {';'.join(info.cuda_archs)} "
        f"(machine code {', '.join(sass) or 'none'}; PTX {', '.join(ptx) or 'none'}), {info.build_type}",
        f"CUTLASS:  {info.cutlass_version}",
    ]


def _compiled_module_line() -> str:
    try:
        from . import _C
    except ImportError as exc:
        return f"module:   flash_mla._C cannot be imported: {exc}"
    return f"module:   {getattr(_C, '__file__', '?')}"


def report(out=sys.stdout) -> int:
    from . import __version__

    package_dir = os.path.dirname(os.path.abspath(__file__))
    lines = [f"flash-mla {__version__}", f"package:  {package_dir}"]
    lines += _build_lines()
    lines.append(_compiled_module_line())
    lines.append(f"python:   {platform.python_version()} ({sys.executable})")
    if os.environ.get("CUDA_FORCE_PTX_JIT", "") not in ("", "0"):
        lines.append("note:     CUDA_FORCE_PTX_JIT is set: kernels are JIT-compiled from the embedded PTX")
    try:
        import torch
    except ImportError:
        lines.append("torch:    not installed (flash_mla.ops works without it)")
        lines.append("GPUs:     unknown (torch is needed to list them here)")
        print("\n".join(lines), file=out)
        return 0
    lines.append(f"torch:    {torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU-only build'})")
    if not torch.cuda.is_available():
        lines.append("GPUs:     none found (torch.cuda.is_available() is False)")
        print("\n".join(lines), file=out)
        return 0
    count = torch.cuda.device_count()
    lines.append(f"GPUs:     {count}")
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        try:
            from .interface import kernel_for_device
            kernel = kernel_for_device(index)
        except Exception as exc:  # shown, not raised: this is a diagnostic
            kernel = f"none ({type(exc).__name__}: {exc})"
        lines.append(f"  GPU {index}: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.multi_processor_count} SMs: kernel 'auto' -> {kernel}")
    print("\n".join(lines), file=out)
    return 0


# ------------------------------------------------------------------------------------------------
# --demo
# ------------------------------------------------------------------------------------------------

HEAD_DIM, HEAD_DIM_V, PAGE = 576, 512, 64


def make_demo_inputs(b, s_q, h_q, h_kv, mean_len, dtype, seed=0):
    """CPU tensors of one demo decode: lengths spread over 0.5x..1.5x mean_len, pages shuffled."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = [max(1, round(mean_len * (0.5 + i / max(1, b - 1)))) for i in range(b)]
    pages_of = [math.ceil(n / PAGE) for n in lengths]
    num_blocks = sum(pages_of)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.zeros((b, max(pages_of)), dtype=torch.int32)
    start = 0
    for i, n in enumerate(pages_of):
        block_table[i, :n] = perm[start:start + n]
        start += n
    q = torch.randn((b, s_q, h_q, HEAD_DIM), generator=gen).to(dtype)
    k_cache = torch.randn((num_blocks, PAGE, h_kv, HEAD_DIM), generator=gen).to(dtype)
    return q, k_cache, block_table, torch.tensor(lengths, dtype=torch.int32)


def check_demo_result(out, lse, q, k_cache, block_table, seqlens):
    """Compares a few requests of (out, lse) (CPU tensors) with flash_mla.reference in float32.

    Returns (ok, one line saying what was compared)."""
    import torch

    from .reference import mla_decode_reference

    b = q.shape[0]
    picks = sorted({0, b // 2, b - 1})
    ref_out, ref_lse = mla_decode_reference(q[picks], k_cache, block_table[picks], seqlens[picks],
                                            HEAD_DIM_V, None, True)
    got_out, got_lse = out[picks].float(), lse[picks].float()
    rel = ((got_out - ref_out).norm() / ref_out.norm()).item()
    lse_err = (got_lse - ref_lse).abs().max().item()
    rel_tol = 1e-2 if q.dtype == torch.bfloat16 else 3e-3
    ok = math.isfinite(rel) and rel <= rel_tol and math.isfinite(lse_err) and lse_err <= 2e-3
    return ok, (f"requests {picks} against flash_mla.reference (float32): relative error of out {rel:.2e} "
                f"(limit {rel_tol:g}), max |lse - ref| {lse_err:.2e} (limit 2e-3): {'PASS' if ok else 'FAIL'}")


def demo(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("flash-mla demo: no CUDA GPU found (torch.cuda.is_available() is False)")
        return 2
    from . import flash_mla_with_kvcache, get_mla_metadata, kernel_for_device

    device = torch.device("cuda", torch.cuda.current_device())
    b, s_q, h_q, h_kv = args.batch, args.s_q, args.heads, args.kv_heads
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    kernel = kernel_for_device(device, args.kernel)

    # Inputs are made on the CPU and copied over (copies launch no kernel), so the only kernels
    # this demo runs are flash-mla's: it also works where torch's own kernels cannot run, e.g.
    # under CUDA_FORCE_PTX_JIT=1.
    q_cpu, k_cpu, table_cpu, seqlens_cpu = make_demo_inputs(b, s_q, h_q, h_kv, args.seqlen, dtype, args.seed)
    q, k_cache = q_cpu.to(device), k_cpu.to(device)
    block_table, seqlens = table_cpu.to(device), seqlens_cpu.to(device)
    lengths = seqlens_cpu.tolist()
    print(f"flash-mla demo on GPU {device.index} ({torch.cuda.get_device_name(device)}), kernel {kernel}: "
          f"b={b}, s_q={s_q}, h_q={h_q}, h_kv={h_kv}, {args.dtype}, causal, "
          f"KV lengths {min(lengths)}..{max(lengths)} (mean {sum(lengths) / b:.0f}) in shuffled 64-token pages")

    meta, splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)

    def call():
        return flash_mla_with_kvcache(q, k_cache, block_table, seqlens, HEAD_DIM_V, meta, splits,
                                      causal=True, kernel=args.kernel)

    t0 = time.perf_counter()
    out, lse = call()
    torch.cuda.synchronize(device)
    first_s = time.perf_counter() - t0
    ok, line = check_demo_result(out.cpu(), lse.cpu(), q_cpu, k_cpu, table_cpu, seqlens_cpu)
    print("check:  " + line)

    # Speed: eager calls back to back on the current stream, metadata reused (as for the layers of
    # one decoding step); the first call above also paid the one-time costs (module loading, and
    # the PTX JIT on GPUs without machine code in the build).
    for _ in range(args.warmup):
        call()
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_ev.record()
    for _ in range(args.reps):
        call()
    end_ev.record()
    end_ev.synchronize()
    per_call_ms = start_ev.elapsed_time(end_ev) / args.reps
    mean_l = sum(lengths) / b
    flops = b * h_q * s_q * mean_l * 2 * (HEAD_DIM + HEAD_DIM_V)
    nbytes = b * (mean_l * h_kv * HEAD_DIM + s_q * h_q * (HEAD_DIM + HEAD_DIM_V)) * q.element_size()
    print(f"time:   {per_call_ms * 1e3:.1f} us per call (mean of {args.reps} eager calls after {args.warmup} "
          f"warm-up; the first call took {first_s * 1e3:.0f} ms): {flops / per_call_ms / 1e9:.0f} TFLOP/s, "
          f"{nbytes / per_call_ms / 1e6:.0f} GB/s")
    print("full table against the copy and GEMM ceilings: python benchmarks/bench_decode.py")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flash_mla",
        description="Print flash-mla's version, build, torch and the kernel each GPU gets; "
                    "--demo runs one decode on the GPU, checks it and times it.")
    parser.add_argument("--demo", action="store_true", help="run one decode on the current GPU: check and time it")
    parser.add_argument("--kernel", default="auto", help="demo: auto (default), sm90, sm80_large, sm80_small")
    parser.add_argument("--batch", type=int, default=64, help="demo: requests (default 64)")
    parser.add_argument("--seqlen", type=int, default=4096, help="demo: mean KV length (default 4096; spread 0.5x-1.5x)")
    parser.add_argument("--heads", type=int, default=128, help="demo: query heads h_q (default 128)")
    parser.add_argument("--kv-heads", type=int, default=1, help="demo: KV heads h_kv (default 1)")
    parser.add_argument("--s-q", type=int, default=1, help="demo: query tokens per request (default 1)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--reps", type=int, default=50, help="demo: timed calls (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="demo: untimed calls before timing (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.demo:
        return report()
    if min(args.batch, args.seqlen, args.heads, args.kv_heads, args.s_q, args.reps) < 1 or args.warmup < 0:
        parser.error("--batch, --seqlen, --heads, --kv-heads, --s-q and --reps must be >= 1")
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
