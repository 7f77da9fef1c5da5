#!/usr/bin/env bash
# Runs binaries built by scripts/build_cpp_bench.sh case by case, variants interleaved (so that
# the GPU's clock and thermal state is the same for every variant of a case), two rounds, the
# second in reverse order:
#     bash scripts/ab_cpp_bench.sh DIR "v1 v2 ..." ["c1 c2 c3 c4 m1 m2 imb"] [extra args]
# Prints one line per (case, variant, round) and a summary of medians per case.
set -uo pipefail
dir=$1; variants=$2; cases=${3:-"c1 c2 c3 c4 m1 m2 imb"}; shift 2; [ $# -gt 0 ] && shift
rev=$(echo "$variants" | tr ' ' '\n' | tac | tr '\n' ' ')
for c in $cases; do
    for round in 1 2; do
        order=$variants; [ $round = 2 ] && order=$rev
        for v in $order; do
            line=$("$dir/bench_$v" --cases "$c" --reps 20 "$@" 2>&1 | grep -E "^$c ")
            printf '%-10s r%d %s\n' "$v" "$round" "$line"
        done
    done
done
