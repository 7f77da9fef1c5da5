#!/usr/bin/env bash
# Profiles one decode case with Nsight Compute and prints the figures that matter for this
# kernel: tensor-core (wgmma) utilisation, DRAM throughput, achieved occupancy, stall reasons.
#   bash benchmarks/profile_ncu.sh [CASE] [KERNEL] [OUTDIR]
#   CASE    bench_decode.py case spec (default: the compute-bound s_q=1, h_q=128, L 8192 row)
#   KERNEL  auto | sm90 | sm80_large | sm80_small (default auto)
# Clocks are left as the card has them (--clock-control none).
set -euo pipefail
cd "$(dirname "$0")/.."
case_spec=${1:-b=128,s_q=1,h_q=128,mean_L=8192,causal=1}
kernel=${2:-auto}
outdir=${3:-${OUT:-./ncu_out}}
mkdir -p "$outdir"
tag=$(echo "$case_spec" | tr ',=' '_-')
log="$outdir/ncu_${kernel}_${tag}.txt"

ncu --clock-control none -k regex:decode_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis \
    --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed \
    python3 benchmarks/bench_decode.py --no-defaults --case "$case_spec" --kernel "$kernel" \
      --skip-ceilings --no-spot-check --reps 2 --warmup 1 > "$log" 2>&1 || { tail -30 "$log"; exit 1; }

echo "== $case_spec [$kernel] (full report: $log)"
# The three figures first, named (on Hopper the hmma pipe counter also counts wgmma; the gmma
# counter reads n/a there), then the raw lines they come from and the stall summary.
metric() { grep -m1 -E "$1" "$log" | awk '{print $NF}'; }
echo "tensor pipe active:  $(metric 'sm__pipe_tensor_op_hmma_cycles_active')% of peak (sustained, active cycles)"
echo "DRAM throughput:     $(metric 'dram__throughput.avg.pct_of_peak_sustained_elapsed')% of peak"
echo "achieved occupancy:  $(metric 'Achieved Occupancy')% (warps)"
grep -E "decode_kernel|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Dynamic Shared Memory Per Block|hmma_cycles_active|dram__throughput|warps_active|mem_shared|Stall|Warp Cycles Per Issued" "$log" \
  | sed 's/^ *//' | head -40
