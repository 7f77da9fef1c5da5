#!/usr/bin/env bash
# Profiles one decode case with Nsight Compute and prints the figures that matter for this
# kernel: tensor-core (wgmma) utilisation, DRAM throughput, achieved occupancy, stall reasons.
#   bash benchmarks/profile_ncu.sh [CASE] [KERNEL] [OUTDIR]
#   CASE    bench_decode.py case spec (default: the compute-bound s_q=1, h_q=128, L 8192 row)
#   KERNEL  auto | sm90 | sm80_large | sm80_small (default auto)
#   bash benchmarks/profile_ncu.sh --sparse [ROW] [KERNEL] [OUTDIR]
#   ROW     a bench_sparse.py row (default v32-b128-h128-s2-k2048): the token-sparse kernel, with
#           the global-load request/sector counts that show how well its gathers use each sector
# Clocks are left as the card has them (--clock-control none).
set -euo pipefail
cd "$(dirname "$0")/.."
sparse=0
if [ "${1:-}" = "--sparse" ]; then sparse=1; shift; fi
if [ $sparse = 1 ]; then case_spec=${1:-v32-b128-h128-s2-k2048}; else case_spec=${1:-b=128,s_q=1,h_q=128,mean_L=8192,causal=1}; fi
kernel=${2:-auto}
outdir=${3:-${OUT:-./ncu_out}}
mkdir -p "$outdir"
tag=$(echo "$case_spec" | tr ',=' '_-')
log="$outdir/ncu_${kernel}_${tag}.txt"

metrics=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed
if [ $sparse = 1 ]; then
  metrics=$metrics,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_srcunit_tex_op_read.sum,dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum
  driver=(python3 benchmarks/bench_sparse.py --rows "$case_spec" --kernels "$kernel" --reps 2)
  kernel_re=regex:sparse_decode_kernel
else
  driver=(python3 benchmarks/bench_decode.py --no-defaults --case "$case_spec" --kernel "$kernel"
          --skip-ceilings --no-spot-check --reps 2 --warmup 1)
  kernel_re=regex:decode_kernel
fi
ncu --clock-control none -k "$kernel_re" --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --metrics "$metrics" \
    "${driver[@]}" > "$log" 2>&1 || { tail -30 "$log"; exit 1; }

echo "== $case_spec [$kernel] (full report: $log)"
# The three figures first, named (on Hopper the hmma pipe counter also counts wgmma; the gmma
# counter reads n/a there), then the raw lines they come from and the stall summary.
metric() { grep -m1 -E "$1" "$log" | awk '{print $NF}'; }
echo "tensor pipe active:  $(metric 'sm__pipe_tensor_op_hmma_cycles_active')% of peak (sustained, active cycles)"
echo "DRAM throughput:     $(metric 'dram__throughput.avg.pct_of_peak_sustained_elapsed')% of peak"
echo "achieved occupancy:  $(metric 'Achieved Occupancy')% (warps)"
grep -E "decode_kernel|l1tex__t_|lts__t_|dram__bytes|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Dynamic Shared Memory Per Block|hmma_cycles_active|dram__throughput|warps_active|mem_shared|Stall|Warp Cycles Per Issued" "$log" \
  | sed "s/^ *//" | head -60
