#!/usr/bin/env bash
# Builds benchmarks/cpp/bench_sm90.cu once per variant, on any machine with nvcc (no GPU):
#     bash scripts/build_cpp_bench.sh OUTDIR NAME="FLAGS" [NAME="FLAGS" ...]
# e.g. bash scripts/build_cpp_bench.sh build/cppbench base="" trace="-DFLASH_MLA_SM90_TRACE"
# gives OUTDIR/bench_base, OUTDIR/bench_trace; carry OUTDIR to the GPU and run the binaries
# there one after the other (same GPU, same run: their numbers compare). CUTLASS comes from
# $CUTLASS_DIR or the nvidia-cutlass Python package.
set -euo pipefail
out=$1; shift
cd "$(dirname "$0")/.."
cutlass=${CUTLASS_DIR:-$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))')}
mkdir -p "$out"
for spec in "$@"; do
    name=${spec%%=*}; flags=${spec#*=}
    echo "== $name: $flags"
    # shellcheck disable=SC2086
    nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Xptxas -v \
        -Iinclude -I"$cutlass/include" $flags benchmarks/cpp/bench_sm90.cu -o "$out/bench_$name" 2>&1 \
        | grep -E "error|warning|spill|Used [0-9]+ registers" | grep -v "Used 1[0-9]* registers, used 0" | sort | uniq -c
done
