#!/usr/bin/env bash
# GPU time of each kernel of a decode call (the split-KV kernel, the merge, the metadata kernel),
# measured by Nsight Compute one kernel at a time, for one bench_decode.py case:
#     bash benchmarks/kernel_times.sh CASE [bench_decode.py args...]
# e.g. bash benchmarks/kernel_times.sh b=128,s_q=1,h_q=128,mean_L=256
#      bash benchmarks/kernel_times.sh b=128,s_q=1,h_q=128,mean_L=256 --compare path/to/module
# With --compare, the compared module's kernels are listed too (by their own names), so the
# whole-call difference of bench_decode.py can be placed in a kernel. Kernels run serialised
# under the profiler (no overlap between a kernel and the next), caches are not flushed between
# them (the merge reads partial outputs that the decode kernel left in L2), clocks are left as the
# card has them. Prints Nsight Compute's per-kernel summary: launches, average, min and max.
set -euo pipefail
cd "$(dirname "$0")/.."
case_spec=${1:?usage: kernel_times.sh CASE [bench_decode.py args...]}
shift
outdir=${OUT:-./ncu_out}
mkdir -p "$outdir"
log="$outdir/kernel_times_$(echo "$case_spec" | sed 's/[^A-Za-z0-9]/_/g').txt"
ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --launch-skip "${SKIP:-20}" --launch-count "${COUNT:-80}" --print-summary per-kernel \
    python3 benchmarks/bench_decode.py --no-defaults --case "$case_spec" --skip-ceilings --no-spot-check \
      --reps 2 --warmup 1 --max-sets 2 "$@" > "$log" 2>&1 || { tail -30 "$log"; exit 1; }
echo "== $case_spec (full report: $log)"
# Each kernel's line (name, grid, block), then its duration row: unit, min, max, average.
grep -E "Context [0-9]+|gpu__time_duration" "$log" | sed -E 's/^ +//; s/\(([^()]*)\) *\(/(...) (/' | cut -c1-220
