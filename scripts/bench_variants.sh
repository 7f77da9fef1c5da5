#!/usr/bin/env bash
# Builds and benchmarks the sm90 kernel once per value of a compile-time knob, in one GPU call:
#     bash scripts/bench_variants.sh MACRO "V1 V2 ..." [bench_decode.py args]
# e.g. bash scripts/bench_variants.sh FLASH_MLA_SM90_PREFETCH_PAIRS "0 1 2" --kernel sm90
# Each variant is installed with CMAKE_ARGS=-DCMAKE_CUDA_FLAGS=-D<MACRO>=<V>; the last one stays
# installed. Logs go to ${OUT:-./variants_out}/variant_<V>.log (one file per variant).
set -uo pipefail
macro=$1; values=$2; shift 2
out=${OUT:-./variants_out}; mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 2
shopt -s nullglob; wheels=(.whl/*.whl); shopt -u nullglob
[ ${#wheels[@]} -gt 0 ] && python3 -m pip install -q --no-deps "${wheels[@]}"
for v in $values; do
    log="$out/variant_$v.log"
    echo "=== $macro=$v" | tee "$log"
    CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-D$macro=$v" python3 -m pip install -q --no-build-isolation --no-deps . >>"$log" 2>&1 \
        || { echo "build failed"; tail -20 "$log"; continue; }
    python3 benchmarks/bench_decode.py "$@" 2>&1 | tee -a "$log" | grep -E "^(ceilings|  )"
done
