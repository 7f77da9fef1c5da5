#!/usr/bin/env python3
"""Timing of the whole MLA decode call, ``flash_mla_with_kvcache``, against measured ceilings.

What is timed: one ``flash_mla_with_kvcache`` call (split kernel + combine, output and
workspace allocation included) with ``get_mla_metadata`` computed once per case beforehand and
reused ("scheduler reuse" in docs/spec), captured N times (10-20) into one CUDA graph and
replayed; the per-call time is the median replay time over N. The compute-bound rows run at the
board's power limit by then; the "burst" column (3 replays before the timed ones, after
``--cool`` seconds of idle GPU) shows the same call below it, the regime the spec's reference
figures match (docs/perf-notes.md, session 5). Where one set of inputs
(q + k_cache) would fit in a few L2 caches, the captured calls rotate among several sets, so
the timing is not a cache measurement.

FLOPs and bytes are counted as the spec counts them (d = 576, dv = 512):

    FLOPs = b * h_q * s_q * mean_L * 2 * (d + dv)        mean_L: mean of the lengths drawn
    bytes = b * (mean_L * h_kv * d + s_q * h_q * (d + dv)) * 2

In the same run it measures the two ceilings: a device-to-device copy (2 GiB, bytes read +
written) and an 8192^3 bf16 GEMM on random data; every row is given as a share of both.

Default cases are the rows of the spec's reference table (b = 128, h_kv = 1, lengths drawn from
normal(mean, mean / 2) clipped to at least s_q, a fixed seed per case; the imbalanced row
with its four fixed lengths).

Examples:
    python3 benchmarks/bench_decode.py --json out/bench.json
    python3 benchmarks/bench_decode.py --only memory --kernel auto,sm80_small
    python3 benchmarks/bench_decode.py --no-defaults \\
        --case b=64,s_q=1,h_q=128,mean_L=4096,causal=1 --case lens=100/5000/0/77,s_q=2,h_q=8
    python3 benchmarks/bench_decode.py --dry-run          # list cases and lengths, no GPU

Each (case, kernel) also gets a cheap sanity check (not a correctness test): outputs finite
where a row sees at least one key, exactly 0 / +inf where it sees none, and the rows of the
shortest and longest request compared with a float32 torch computation of the same attention.
The KV slots past each request's length in its last page are filled with NaN, as the spec
allows, so a kernel that reads them shows up here.

Exit status: 0 when every (case, kernel) ran and passed its sanity check, 1 otherwise,
2 for a usage error or when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import datetime
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
PAGE = 64
KNOWN_KERNELS = ("auto", "sm90", "sm80_large", "sm80_small")
KINDS = ("compute", "memory", "imbalanced")

# Rows of the reference table of docs/spec (mla-decode.md): upstream FlashMLA, one H200.
SPEC_ROWS = [
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
SPEC_REF_NOTE = ("upstream FlashMLA on one H200, CUDA 13.0, one run (copy 4290 GB/s, "
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
        self.ref = ref  # dict(ms, rate, unit) for spec rows
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
    def flops(self):
        # b * h_q * s_q * mean_L * 2 * (d + dv), with b * mean_L = sum of the lengths
        return float(self.h_q) * self.s_q * self.total_L * 2 * (D + DV)

    @property
    def bytes(self):
        # b * (mean_L * h_kv * d + s_q * h_q * (d + dv)) * 2
        return float(self.total_L * self.h_kv * D + self.b * self.s_q * self.h_q * (D + DV)) * 2

    def describe(self):
        return dict(name=self.name, kind=self.kind, b=self.b, s_q=self.s_q, h_q=self.h_q,
                    h_kv=self.h_kv, causal=self.causal, target_mean_L=self.target_mean_L,
                    mean_L=self.mean_L, min_L=min(self.lens), max_L=max(self.lens),
                    flops=self.flops, bytes=self.bytes, spec_ref=self.ref, lengths=self.lens)


def draw_lengths(b, mean_L, s_q, seed, tag):
    """normal(mean, mean / 2), truncated to int, at least s_q; seeded by the case itself so
    that a case gets the same lengths whatever other cases run with it."""
    if mean_L is None or mean_L <= 0:
        raise ValueError("mean_L must be a positive integer (or give lens=...)")
    rng = random.Random(f"flash-mla-bench:{seed}:{':'.join(str(t) for t in tag)}")
    return [int(max(rng.normalvariate(mean_L, mean_L / 2), s_q)) for _ in range(b)]


def spec_cases(seed, only=None):
    out = []
    for row in SPEC_ROWS:
        if only and row["kind"] not in only:
            continue
        ref = dict(ms=row["ref_ms"], rate=row["ref_rate"], unit=row["ref_unit"])
        out.append(Case(row["kind"], row["b"], row["s_q"], row["h_q"], 1,
                        mean_L=row.get("mean_L"), lens=row.get("lens"), causal=row["causal"],
                        ref=ref, seed=seed))
    return out


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
    # A custom case equal to a spec row gets that row's reference figures.
    for ref_case in spec_cases(seed):
        if (ref_case.lens == case.lens and ref_case.s_q == case.s_q and ref_case.h_q == case.h_q
                and ref_case.h_kv == case.h_kv and ref_case.causal == case.causal):
            case.ref = ref_case.ref
    return case


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time flash_mla_with_kvcache by CUDA-graph replay against copy/GEMM ceilings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:" + __doc__.split("Examples:", 1)[1].split("\n\n", 1)[0])
    p.add_argument("--kernel", default="auto",
                   help="comma-separated kernel choices passed as kernel=... "
                        f"({', '.join(KNOWN_KERNELS)}); each case runs with each (default auto)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated kinds of spec rows to run ({', '.join(KINDS)})")
    p.add_argument("--no-defaults", action="store_true", help="run only the --case cases")
    p.add_argument("--case", action="append", default=[], metavar="K=V,...",
                   help="extra case, repeatable: b=, s_q=, h_q=, h_kv=, mean_L=, causal=0|1, "
                        "lens=a/b/c (explicit lengths instead of mean_L), name=, kind=")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results here")
    p.add_argument("--seed", type=int, default=0, help="seed of lengths and data (default 0)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--pages", choices=("contiguous", "shuffled"), default="contiguous",
                   help="physical page order: each request's pages consecutive (as upstream's "
                        "benchmark) or a random permutation (default contiguous)")
    p.add_argument("--reps", type=int, default=20, help="timed graph replays (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed graph replays (default 3)")
    p.add_argument("--cool", type=float, default=0.0, metavar="SECONDS",
                   help="idle time before each case's burst replays, so that they run below the "
                        "board's power limit (the 'burst' column; default 0: they run in "
                        "whatever state the case before left)")
    p.add_argument("--calls-per-graph", type=int, default=0,
                   help="calls captured per graph; 0 = auto, 10 to 20 (default 0)")
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
                   help="print the cases, lengths, FLOPs and bytes, then exit (no GPU needed)")
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
    if args.reps < 1 or args.warmup < 0 or args.max_sets < 1 or args.calls_per_graph < 0 or args.cool < 0:
        p.error("--reps, --max-sets must be >= 1; --warmup, --calls-per-graph, --cool >= 0")
    cases = [] if args.no_defaults else spec_cases(args.seed, only)
    for text in args.case:
        try:
            cases.append(parse_case(text, args.seed))
        except ValueError as exc:
            p.error(str(exc))
    if not cases:
        p.error("no cases selected")
    args.cases = cases
    return args


# ----------------------------------------------------------------------------------------------
# Formatting (standard library only)
# ----------------------------------------------------------------------------------------------

def fmt_time(ms):
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 0.1 else f"{ms:.3f} ms"


def fmt_num(x, digits=0, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def fmt_ref(ref):
    if not ref:
        return "-"
    return f"{fmt_time(ref['ms'])} {ref['rate']:.0f} {ref['unit']}"


def check_label(res):
    if res.get("error"):
        msg = res["error"].splitlines()[0] if res["error"] else "error"
        return "ERROR " + (msg[:48] + "..." if len(msg) > 51 else msg)
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


def table_rows(results):
    """results: list of (case_dict, result_dict)."""
    rows = []
    for case, res in results:
        ref = case.get("spec_ref")
        ms = res.get("ms")
        vs = None
        if ref and ms:
            vs = ref["ms"] / ms
        rows.append([
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
            check_label(res),
        ])
    return rows


TABLE_HEADER = ["case", "kernel", "time/call", "burst", "TFLOP/s", "GB/s", "%GEMM", "%copy",
                "spec ref (H200)", "ref/ours", "SM MHz", "check"]


def format_table(header, rows, numeric=(2, 3, 4, 5, 6, 7, 9)):
    """Plain-text table; columns whose index is in numeric are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        cells = []
        for i, c in enumerate(r):
            c = str(c)
            cells.append(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]))
        return " | ".join(cells).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def format_report(report):
    lines = []
    cool = (report.get("settings") or {}).get("cool_s", 0)
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
    pairs = [(case, res) for case in report.get("cases", []) for res in case.get("results", [])]
    lines.append(format_table(TABLE_HEADER, table_rows(pairs)))
    lines.append("time/call: median over graph replays / calls per graph; ref/ours > 1 means "
                 "faster than the spec figure (" + SPEC_REF_NOTE + "). SM MHz: median SM clock "
                 "while the replays ran (nvidia-smi, 50 ms samples), 'cap': the board's power "
                 "limit held it down in most samples. burst: the median of 3 graph replays (after "
                 "1 untimed) before the timed ones, per call" + (f", each case after {cool:g} s "
                 "idle, below the power limit" if cool else ", in the state the case before "
                 "left") + "; the rates are the median's.")
    return "\n".join(lines)


def summary_line(report, json_path=None):
    pairs = [res for case in report.get("cases", []) for res in case.get("results", [])]
    bad = [r for r in pairs if r.get("error") or not (r.get("sanity") or {}).get("ok")]
    c = report.get("ceilings", {})
    cp, gm = c.get("copy") or {}, c.get("gemm") or {}
    return (f"bench_decode: {len(report.get('cases', []))} cases x "
            f"{len(report.get('kernels', []))} kernels, {len(pairs) - len(bad)} ok, "
            f"{len(bad)} failed; copy {fmt_num(cp.get('gbps'), 0)} GB/s, GEMM "
            f"{fmt_num(gm.get('tflops'), 0)} TFLOP/s"
            + (f"; json: {json_path}" if json_path else ""))


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
    print(f"{len(args.cases)} cases, kernels: {', '.join(args.kernels)}, dtype {args.dtype}, "
          f"seed {args.seed}")
    rows = []
    for c in args.cases:
        rows.append([c.name, c.b, c.s_q, c.h_q, c.h_kv, int(c.causal), f"{c.mean_L:.1f}",
                     min(c.lens), max(c.lens), f"{c.flops / 1e9:.2f}", f"{c.bytes / 1e6:.1f}",
                     fmt_ref(c.ref)])
    print(format_table(["case", "b", "s_q", "h_q", "h_kv", "causal", "mean L", "min L", "max L",
                        "GFLOP", "MB", "spec ref (H200)"], rows, numeric=range(1, 11)))
    for c in args.cases:
        print(f"lengths[{c.name}]: {c.lens}")
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


class Inputs:
    """Paged KV cache(s), block table and queries of one case, on the GPU."""

    def __init__(self, torch, case, args, dev, dtype, l2_bytes):
        self.torch = torch
        b, lens = case.b, case.lens
        gen_cpu = torch.Generator().manual_seed(args.seed * 1000003 + 17)
        pages_per = [(L + PAGE - 1) // PAGE for L in lens]
        num_pages = max(1, sum(pages_per))
        width = max(1, max(pages_per))
        if args.pages == "shuffled":
            order = torch.randperm(num_pages, generator=gen_cpu).tolist()
        else:
            order = list(range(num_pages))
        # Columns past ceil(L/64) hold junk, as the spec allows: valid page ids, not ours.
        table = torch.randint(0, num_pages, (b, width), generator=gen_cpu, dtype=torch.int32)
        tail = []  # flat token slots past L in each request's last page
        off = 0
        for i, (L, n) in enumerate(zip(lens, pages_per)):
            if n:
                table[i, :n] = torch.tensor(order[off:off + n], dtype=torch.int32)
                last = order[off + n - 1]
                tail.extend(range(last * PAGE + L - (n - 1) * PAGE, (last + 1) * PAGE))
            off += n
        self.block_table = table.to(dev)
        self.cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
        self.num_pages = num_pages
        self.set_bytes = (num_pages * PAGE * case.h_kv * D + b * case.s_q * case.h_q * D) * 2
        if l2_bytes > 0:
            want = math.ceil(args.l2_factor * l2_bytes / self.set_bytes)
        else:
            want = 1
        self.n_sets = max(1, min(args.max_sets, want))
        tail_idx = torch.tensor(tail, dtype=torch.long, device=dev) if tail else None
        gen = torch.Generator(device=dev).manual_seed(args.seed * 7919 + 1)
        self.qs, self.ks = [], []
        for _ in range(self.n_sets):
            k = torch.randn(num_pages, PAGE, case.h_kv, D, dtype=dtype, device=dev, generator=gen)
            if tail_idx is not None:
                k.view(num_pages * PAGE, case.h_kv, D)[tail_idx] = float("nan")
            q = torch.randn(b, case.s_q, case.h_q, D, dtype=dtype, device=dev, generator=gen)
            self.ks.append(k)
            self.qs.append(q)


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
    n = (L + PAGE - 1) // PAGE
    pages = inp.block_table[i, :n].long()
    K = inp.ks[set_idx][pages].reshape(n * PAGE, h_kv, D)[:L].float().permute(1, 0, 2)
    Q = inp.qs[set_idx][i].float().reshape(s_q, h_kv, g, D).permute(1, 0, 2, 3)
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
    if lse.dtype != torch.float32 or out.dtype != inp.qs[0].dtype:
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


def run_kernel(torch, fm, case, inp, meta, splits, kernel, args, ceil, sampler):
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
                                         DV, meta, splits, causal=case.causal, **kw)

    # Eager call: argument errors surface here, before any capture; then the sanity check.
    out, lse = call(0)
    torch.cuda.synchronize()
    res["sanity"] = sanity(torch, case, inp, out, lse, 0, not args.no_spot_check, scale)
    del out, lse

    eager = time_events(torch, lambda: call(0), 5, 2)
    res["eager_ms"] = _median(eager)
    n_calls = args.calls_per_graph or max(10, min(20, math.ceil(20.0 / max(res["eager_ms"],
                                                                           1e-3))))
    res["calls_per_graph"] = n_calls
    res["n_sets"] = inp.n_sets
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(n_calls):
                g_out, g_lse = call(j)
        # Burst: the first replays after --cool seconds of idle GPU, below the board's power limit.
        if args.cool > 0:
            torch.cuda.synchronize()
            time.sleep(args.cool)
        res["burst_ms"] = _median(time_events(torch, graph.replay, 3, 1)) / n_calls
        t0 = time.perf_counter()
        times = time_events(torch, graph.replay, args.reps, args.warmup)
        res["clock"] = sampler.window(t0, time.perf_counter())
        per_call = [t / n_calls for t in times]
        res["timing"] = "graph"
        # The graph's last outputs: finite where expected after replay too.
        vis = visible_mask(torch, case, g_out.device)
        bad = int((~torch.isfinite(g_out) & vis[:, :, None, None]).sum()) + \
            int((~torch.isfinite(g_lse) & vis[:, None, :]).sum())
        if bad:
            res["sanity"]["ok"] = False
            res["sanity"]["problems"].append(f"graph replay: {bad} non-finite")
        del graph, g_out, g_lse
    except Exception as exc:  # noqa: BLE001 - capture failing is itself a finding
        res["graph_error"] = f"{type(exc).__name__}: {exc}"
        res["timing"] = "eager"
        torch.cuda.synchronize()
        per_call = time_events(torch, lambda: call(0), args.reps, args.warmup)
        res["sanity"]["ok"] = False
        res["sanity"]["problems"].append("CUDA-graph capture failed")
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
                                cool_s=args.cool,
                                max_sets=args.max_sets, l2_factor=args.l2_factor, d=D, dv=DV,
                                page_block_size=PAGE),
                  formulas=dict(flops="b*h_q*s_q*mean_L*2*(d+dv)",
                                bytes="b*(mean_L*h_kv*d + s_q*h_q*(d+dv))*2",
                                time="median over graph replays of (replay time / calls per graph)"),
                  spec_ref_note=SPEC_REF_NOTE, kernels=args.kernels, ceilings={}, cases=[])
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
        inp = meta = splits = None
        try:
            if fm is None:
                raise RuntimeError("flash_mla not importable: "
                                   + report.get("flash_mla_import_error", ""))
            inp = Inputs(torch, case, args, dev, dtype, l2)
            entry.update(num_pages=inp.num_pages, n_sets=inp.n_sets, set_bytes=inp.set_bytes)
            meta, splits = fm.get_mla_metadata(inp.cache_seqlens, case.s_q * case.h_q // case.h_kv,
                                               case.h_kv)
            torch.cuda.synchronize()
            setup_err = None
        except Exception as exc:  # noqa: BLE001
            setup_err = f"setup: {type(exc).__name__}: {exc}"
        for kernel in args.kernels:
            if setup_err:
                entry["results"].append(dict(kernel=kernel, error=setup_err))
                continue
            try:
                res = run_kernel(torch, fm, case, inp, meta, splits, kernel, args, ceil, sampler)
            except Exception as exc:  # noqa: BLE001
                res = dict(kernel=kernel, error=f"{type(exc).__name__}: {exc}")
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a sticky CUDA error; later cases report it
                    pass
            entry["results"].append(res)
            r = res
            print(f"  {case.name} [{kernel}]: {fmt_time(r.get('ms'))} (fastest replay "
                  f"{fmt_time(r.get('ms_min'))}, burst {fmt_time(r.get('burst_ms'))}), "
                  f"{fmt_num(r.get('tflops'), 1)} TFLOP/s, "
                  f"{fmt_num(r.get('gbps'), 0)} GB/s, SM MHz {clock_label(r.get('clock'))}, "
                  f"{check_label(r)}", flush=True)
        entry["wall_s"] = time.perf_counter() - t0
        del inp, meta, splits
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
        write_json(args.json, report)

    sampler.close()
    print()
    print(format_report(report))
    line = summary_line(report, args.json)
    report["summary"] = line
    write_json(args.json, report)
    print(line)
    pairs = [r for c in report["cases"] for r in c["results"]]
    failed = any(r.get("error") or not (r.get("sanity") or {}).get("ok") for r in pairs)
    return 1 if failed or fm is None else 0


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
