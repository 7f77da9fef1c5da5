#!/usr/bin/env bash
# Runs binaries built by scripts/build_cpp_bench.sh case by case, variants interleaved (so that
# the GPU's clock and thermal state is the same for every variant of a case), in rounds that
# alternate the order:
#     bash scripts/ab_cpp_bench.sh DIR "v1 v2 ..." ["c1 c2 c3 c4 m1 m2 imb"] [extra args]
# Prints one line per (case, variant, round).
# Environment: REPS (default 20: a short run, mostly before the board's power limit lowers the
# clock), ROUNDS (default 2), PROBE=1 (each run under scripts/clock_probe.sh: its SM clock,
# power and board energy are printed after its line; the energy includes the process's setup,
# so difference two REPS values for an energy per call: REPS x sets calls per run). With REPS in the thousands a run lasts seconds and measures
# the sustained, power-capped state instead (docs/performance.md, "The power limit").
set -uo pipefail
dir=$1; variants=$2; cases=${3:-"c1 c2 c3 c4 m1 m2 imb"}; shift 2; [ $# -gt 0 ] && shift
reps=${REPS:-20}; rounds=${ROUNDS:-2}; probe=${PROBE:-0}
here=$(cd "$(dirname "$0")" && pwd)
rev=$(echo "$variants" | tr ' ' '\n' | tac | tr '\n' ' ')
for c in $cases; do
    for round in $(seq 1 "$rounds"); do
        order=$variants; [ $((round % 2)) = 0 ] && order=$rev
        for v in $order; do
            if [ "$probe" = 1 ]; then
                out=$(bash "$here/clock_probe.sh" "/tmp/ab_probe_$$.csv" -- "$dir/bench_$v" --cases "$c" --reps "$reps" "$@" 2>&1)
                line=$(echo "$out" | grep -E "^$c ")
                clk=$(echo "$out" | grep -E "^clock_probe" | sed -E 's/.*SM clock median ([0-9]+) MHz.*power median ([0-9]+) W.*capped in ([0-9]+)%.*energy ([0-9.?]+) J.*/[\1 MHz, \2 W, capped \3%, \4 J]/')
                printf '%-10s r%d %s %s\n' "$v" "$round" "$line" "$clk"
            else
                line=$("$dir/bench_$v" --cases "$c" --reps "$reps" "$@" 2>&1 | grep -E "^$c ")
                printf '%-10s r%d %s\n' "$v" "$round" "$line"
            fi
        done
    done
done
rm -f "/tmp/ab_probe_$$.csv"
