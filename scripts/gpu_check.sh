#!/usr/bin/env bash
# The maintainers' GPU check, run on a GPU machine for every kernel change: environment, local
# wheels, build + install, Python tests, C++ tests, the C++ package check (install +
# out-of-tree examples/cpp), the decode benchmark and compute-sanitizer. It needs no network:
# the nvidia-cutlass wheel (and any other wheel the machine lacks) goes in .whl/ (git-ignored).
# Run from the repository root:
#
#     bash scripts/gpu_check.sh [OUTDIR]          # OUTDIR defaults to ${OUT:-./gpu_out}
#
# Every step runs even when an earlier one failed (the benchmark runs after a failed test);
# each step's output goes to stdout and to a log in OUTDIR; a short summary comes last (so that
# the tail of the output is enough) and is also written to OUTDIR/summary.txt.
# Exit status: 0 when no step failed or timed out, 1 otherwise (skipped steps don't count).
#
# Files in OUTDIR (8, 9 with BENCH_SPARSE_ARGS; all at its top level, for runners that collect a
# few flat files):
#     setup.log (env + wheels), build.log, pytest.log, ctest.log (ctest + package), bench.log,
#     bench.json (bench_sparse.json with BENCH_SPARSE_ARGS), sanitize.log, summary.txt
#
# Environment knobs:
#     SKIP_BUILD=1      skip the pip build/install (and the wheels step when .whl/ is empty)
#     SKIP_TESTS=1      skip pytest, ctest and package (SKIP_PYTEST=1 / SKIP_CTEST=1 /
#                       SKIP_PACKAGE=1: one of them)
#     SKIP_BENCH=1      skip the benchmark
#     SKIP_SANITIZE=1   skip the compute-sanitizer step (scripts/sanitize.sh: memcheck, racecheck,
#                       synccheck on a small workload; last step, several minutes). Under a time
#                       budget it runs only when SANITIZE_MIN_S (default 240) seconds are left,
#                       else it is skipped (not failed): run it alone with
#                       SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1 (SANITIZE_TOOLS=... picks tools)
#     BENCH_ARGS="..."  extra arguments of benchmarks/bench_decode.py (e.g. "--kernel auto,sm80_small")
#     BENCH_SPARSE_ARGS="..."  also run benchmarks/bench_sparse.py (token-sparse decode) in the
#                       benchmark step with these arguments (e.g. "--quick --compare DIR"),
#                       results in bench_sparse.json; unset: not run
#     PYTEST_ARGS="..." extra arguments of pytest (e.g. "-x -k decode")
#     CMAKE_ARGS="..."  extra arguments of the cmake configure of the C++ tests
#     CTEST_ARGS="..."  extra arguments of ctest
#     BUILD_DIR=build-gpu   cmake build folder of the C++ tests (the package step installs it)
#     EXAMPLE_CUDA_ARCHS="90a"  CMAKE_CUDA_ARCHITECTURES of the out-of-tree example
#                       (default: the GPU's, 90a on Hopper, from nvidia-smi; else "80;90a")
#     PYTHON=python3    the interpreter (the one holding torch)
#     GPU_CHECK_BUDGET_S=N  wall-clock budget of the whole script in seconds: a step is killed
#                       when it would run past it and later steps are skipped, so that the
#                       summary still gets printed inside a runner's time limit.
#                       Default 560 when $OUT is set (a runner with a 600 s limit per
#                       command), else 0 = none.
#                       Split a long round over calls: SKIP_TESTS=1 SKIP_BENCH=1 first, then
#                       SKIP_BUILD=1 (build/ is git-ignored, so it stays on a warm machine).

set -u -o pipefail

START_TS=$(date +%s)
ORIG_PWD=$PWD
OUTDIR=${1:-${OUT:-./gpu_out}}
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)

# The repository root is the parent of this script's folder.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
[ "$ROOT" = "$ORIG_PWD" ] || echo "gpu_check: note: running in $ROOT (called from $ORIG_PWD)"

export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 8)}
export PY=${PYTHON:-python3}
export OUTDIR ROOT
export BENCH_ARGS=${BENCH_ARGS:-}
export BENCH_SPARSE_ARGS=${BENCH_SPARSE_ARGS:-}
export PYTEST_ARGS=${PYTEST_ARGS:-}
export CMAKE_ARGS=${CMAKE_ARGS:-}
export CTEST_ARGS=${CTEST_ARGS:-}
export BUILD_DIR=${BUILD_DIR:-build-gpu}
export SKIP_BUILD=${SKIP_BUILD:-0}
# Default budget only when OUT is set (a runner whose commands are killed at 600 s).
if [ -n "${OUT:-}" ]; then BUDGET_S=${GPU_CHECK_BUDGET_S:-560}; else BUDGET_S=${GPU_CHECK_BUDGET_S:-0}; fi
RESERVE_S=15  # kept back for the summary

SETUP_LOG=$OUTDIR/setup.log
BUILD_LOG=$OUTDIR/build.log
PYTEST_LOG=$OUTDIR/pytest.log
CTEST_LOG=$OUTDIR/ctest.log
BENCH_LOG=$OUTDIR/bench.log
BENCH_JSON=$OUTDIR/bench.json
SANITIZE_LOG=$OUTDIR/sanitize.log
SUMMARY=$OUTDIR/summary.txt
export BENCH_JSON
for f in "$SETUP_LOG" "$BUILD_LOG" "$PYTEST_LOG" "$CTEST_LOG" "$BENCH_LOG" "$SANITIZE_LOG" "$SUMMARY"; do
    : >"$f"
done
rm -f "$BENCH_JSON" "$BENCH_JSON.tmp" "$OUTDIR/bench_sparse.json"

# ------------------------------------------------------------------------------------------
# Step bodies. Each runs in its own bash (exported functions) so that a step can be killed at
# the time budget with everything it started.
# ------------------------------------------------------------------------------------------

step_env() {
    local rc=0
    echo "--- nvidia-smi -L"
    nvidia-smi -L || rc=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>&1 || true
    echo "--- nvcc --version"
    if command -v nvcc >/dev/null 2>&1; then nvcc --version; else echo "nvcc: not on PATH"; fi
    echo "--- python / torch"
    "$PY" - <<'EOF' || rc=1
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
EOF
    echo "--- tools"
    cmake --version 2>&1 | head -n 1
    echo "ninja $(ninja --version 2>&1)"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(nanobind|scikit[-_]build[-_]core|nvidia[-_]cutlass|pytest|numpy) ' || true
    echo "--- host"
    uname -srm
    echo "cpus $(nproc)"
    git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "git: no commit"
    return $rc
}

step_wheels() {
    shopt -s nullglob
    local whls=("$ROOT"/.whl/*.whl)
    if [ ${#whls[@]} -eq 0 ]; then
        echo "no wheels in .whl/ -- put the nvidia-cutlass wheel there (pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl)"
        return 1
    fi
    printf 'wheel: %s\n' "${whls[@]##*/}"
    "$PY" -m pip install --no-index --no-deps "${whls[@]}" || return 1
    "$PY" -m pip show nvidia-cutlass 2>/dev/null | grep -E '^(Name|Version|Location):' || true
}

step_build() {
    local t0 rc
    t0=$(date +%s)
    echo "+ $PY -m pip install --no-build-isolation --no-deps -v ."
    "$PY" -m pip install --no-build-isolation --no-deps -v .
    rc=$?
    echo "build+install took $(( $(date +%s) - t0 )) s (pip rc=$rc)"
    [ $rc -eq 0 ] || return $rc
    # Import the installed package from outside the source tree.
    (cd /tmp && "$PY" - <<'EOF')
import flash_mla, flash_mla._C
print("installed:", flash_mla.__file__, "version", getattr(flash_mla, "__version__", "?"))
try:
    import torch
    for k in ("auto", "sm80_large", "sm80_small"):
        print(f"kernel_for_device({k!r}) =", flash_mla.kernel_for_device("cuda", k))
except Exception as exc:  # informative only
    print("kernel_for_device:", repr(exc))
EOF
    # What a bug report would quote (version, build, GPUs, kernel per GPU); informative only.
    (cd /tmp && "$PY" -m flash_mla) || echo "python -m flash_mla failed (rc=$?)"
}

step_smoke() {
    # A short, hard-timed decode check before the long steps: a kernel that hangs (a deadlock on
    # a barrier) would otherwise eat the whole budget inside pytest.
    timeout --kill-after=5 "${SMOKE_TIMEOUT_S:-150}" \
        "$PY" -m pytest -x -q tests/python/test_decode_gpu.py -k "forced_kernel or all_lengths_zero"
}

step_pytest() {
    # shellcheck disable=SC2086 # PYTEST_ARGS is a word list on purpose
    "$PY" -m pytest -q tests/python $PYTEST_ARGS
    local rc=$?
    [ $rc -eq 5 ] && echo "pytest: no tests were collected (rc 5)"
    return $rc
}

step_ctest() {
    local extra=() nb_dir
    nb_dir=$("$PY" -m nanobind --cmake_dir 2>/dev/null) && extra+=("-Dnanobind_DIR=$nb_dir")
    # FindPython (nanobind) and FindPython3 (third_party/cutlass.cmake) must both see the
    # interpreter that holds torch, nanobind and the nvidia-cutlass headers.
    extra+=("-DPython_EXECUTABLE=$(command -v "$PY")" "-DPython3_EXECUTABLE=$(command -v "$PY")")
    echo "+ cmake -S . -B $BUILD_DIR -G Ninja -DFLASH_MLA_BUILD_TESTS=ON ${extra[*]} $CMAKE_ARGS"
    # shellcheck disable=SC2086
    cmake -S . -B "$BUILD_DIR" -G Ninja -DFLASH_MLA_BUILD_TESTS=ON \
        -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" "${extra[@]}" $CMAKE_ARGS \
        || { echo "GPU_CHECK_STAGE_FAILED=configure"; return 11; }
    local t0
    t0=$(date +%s)
    echo "+ cmake --build $BUILD_DIR"
    cmake --build "$BUILD_DIR" || { echo "GPU_CHECK_STAGE_FAILED=build"; return 12; }
    echo "C++ build took $(( $(date +%s) - t0 )) s"
    echo "+ ctest --test-dir $BUILD_DIR --output-on-failure --no-tests=error $CTEST_ARGS"
    # shellcheck disable=SC2086
    ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error $CTEST_ARGS \
        || { echo "GPU_CHECK_STAGE_FAILED=ctest"; return 13; }
}

step_package() {
    # The C++ consumer check: cmake --install the C++ build to a temporary prefix, then build
    # examples/cpp out of tree against it (find_package(flash_mla CONFIG REQUIRED)) and run it.
    local tmp archs cc rc
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/flash_mla_pkg.XXXXXX") || return 1
    if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
        echo "+ cmake -S . -B $BUILD_DIR -G Ninja -DFLASH_MLA_BUILD_TESTS=OFF (not configured by ctest)"
        cmake -S . -B "$BUILD_DIR" -G Ninja -DFLASH_MLA_BUILD_TESTS=OFF \
            "-DPython3_EXECUTABLE=$(command -v "$PY")" || { echo "GPU_CHECK_STAGE_FAILED=configure"; return 11; }
    fi
    echo "+ cmake --install $BUILD_DIR --prefix $tmp/prefix"
    cmake --install "$BUILD_DIR" --prefix "$tmp/prefix" >"$tmp/install.log" 2>&1 \
        || { cat "$tmp/install.log"; echo "GPU_CHECK_STAGE_FAILED=install"; return 14; }
    echo "installed $(grep -c 'Installing:' "$tmp/install.log") files; package files:"
    ls "$tmp"/prefix/*/cmake/flash_mla/
    archs=${EXAMPLE_CUDA_ARCHS:-}
    if [ -z "$archs" ]; then
        cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
        case $cc in
            90) archs=90a ;;
            [0-9][0-9]|[0-9][0-9][0-9]) archs=$cc ;;
            *) archs="80;90a" ;;
        esac
    fi
    echo "+ cmake -S examples/cpp -B $tmp/build -DCMAKE_PREFIX_PATH=$tmp/prefix -DCMAKE_CUDA_ARCHITECTURES=$archs"
    cmake -S examples/cpp -B "$tmp/build" -G Ninja "-DCMAKE_PREFIX_PATH=$tmp/prefix" \
        "-DCMAKE_CUDA_ARCHITECTURES=$archs" "-DPython3_EXECUTABLE=$(command -v "$PY")" \
        || { echo "GPU_CHECK_STAGE_FAILED=example-configure"; return 15; }
    echo "+ cmake --build $tmp/build"
    cmake --build "$tmp/build" || { echo "GPU_CHECK_STAGE_FAILED=example-build"; return 16; }
    echo "+ $tmp/build/mla_decode_example"
    "$tmp/build/mla_decode_example"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "+ $tmp/build/sparse_decode_example"
        "$tmp/build/sparse_decode_example"
        rc=$?
    fi
    rm -rf "$tmp"
    case $rc in
        0) ;;
        77) echo "GPU_CHECK_STAGE_FAILED=example-skipped (no usable GPU)"; return 17 ;;
        *) echo "GPU_CHECK_STAGE_FAILED=example (rc=$rc)"; return 18 ;;
    esac
}

step_bench() {
    # --cool 2: each case's burst replays after 2 s idle, below the board's power limit
    echo "+ $PY benchmarks/bench_decode.py --json $BENCH_JSON --cool 2 $BENCH_ARGS"
    # shellcheck disable=SC2086
    "$PY" benchmarks/bench_decode.py --json "$BENCH_JSON" --cool 2 $BENCH_ARGS
    local rc=$?
    if [ -n "${BENCH_SPARSE_ARGS:-}" ]; then
        echo "+ $PY benchmarks/bench_sparse.py --json $OUTDIR/bench_sparse.json $BENCH_SPARSE_ARGS"
        # shellcheck disable=SC2086
        "$PY" benchmarks/bench_sparse.py --json "$OUTDIR/bench_sparse.json" $BENCH_SPARSE_ARGS || rc=$?
    fi
    return $rc
}

step_sanitize() {
    PYTHON="$PY" bash "$ROOT/scripts/sanitize.sh"
}

export -f step_env step_wheels step_build step_smoke step_pytest step_ctest step_package step_bench step_sanitize

# ------------------------------------------------------------------------------------------
# Runner
# ------------------------------------------------------------------------------------------

STEP_NAMES=()
declare -A STATUS=() SECS=() LOGOF=() FIRST_LINE=() LAST_LINE=()

record() {  # record NAME STATUS SECONDS LOG
    STEP_NAMES+=("$1")
    STATUS[$1]=$2
    SECS[$1]=$3
    LOGOF[$1]=$4
    LAST_LINE[$1]=$(wc -l <"$4")
}

mark_start() {  # mark_start NAME LOG: where this step's part of a shared log begins
    FIRST_LINE[$1]=$(( $(wc -l <"$2") + 1 ))
}

step_part() {  # the lines of NAME's log written by NAME, without the runner's own lines
    sed -n "${FIRST_LINE[$1]:-1},${LAST_LINE[$1]:-\$}p" "${LOGOF[$1]}" \
        | grep -v -E "^(=+ \[$1\] |\[$1\] )"
}

run_step() {  # run_step NAME LOG FUNCTION
    local name=$1 log=$2 fn=$3 t0 rc left status
    local now elapsed
    mark_start "$name" "$log"
    now=$(date +%s)
    elapsed=$(( now - START_TS ))
    {
        echo
        echo "=================== [$name] $(date -u +%H:%M:%S) (t+${elapsed}s) ==================="
    } | tee -a "$log"
    t0=$now
    if [ "$BUDGET_S" -gt 0 ]; then
        left=$(( BUDGET_S - elapsed - RESERVE_S ))
        if [ "$left" -lt 5 ]; then
            echo "[$name] skipped: time budget (${BUDGET_S}s) spent" | tee -a "$log"
            record "$name" "SKIP(time)" 0 "$log"
            return 0
        fi
        timeout --kill-after=10 "$left" bash -c "$fn" </dev/null 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
    else
        bash -c "$fn" </dev/null 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
    fi
    case $rc in
        0) status=PASS ;;
        124|137) status=TIMEOUT ;;
        *) status="FAIL(rc=$rc)" ;;
    esac
    [ "$BUDGET_S" -gt 0 ] && [ "$rc" -eq 124 ] && echo "[$name] killed at the time budget" | tee -a "$log"
    echo "[$name] $status in $(( $(date +%s) - t0 )) s" | tee -a "$log"
    record "$name" "$status" "$(( $(date +%s) - t0 ))" "$log"
}

skip_step() {  # skip_step NAME LOG WHY
    mark_start "$1" "$2"
    echo "[$1] skipped: $3" | tee -a "$2"
    record "$1" "SKIP" 0 "$2"
}

run_step env "$SETUP_LOG" step_env

shopt -s nullglob
WHEELS=("$ROOT"/.whl/*.whl)
shopt -u nullglob
if [ "$SKIP_BUILD" = 1 ] && [ ${#WHEELS[@]} -eq 0 ]; then
    skip_step wheels "$SETUP_LOG" "SKIP_BUILD=1 and no wheels carried"
else
    run_step wheels "$SETUP_LOG" step_wheels
fi

if [ "$SKIP_BUILD" = 1 ]; then
    skip_step build "$BUILD_LOG" "SKIP_BUILD=1"
else
    run_step build "$BUILD_LOG" step_build
fi

SMOKE_OK=1
if [ "${SKIP_TESTS:-0}" = 1 ] && [ "${SKIP_BENCH:-0}" = 1 ] && [ "${SKIP_SANITIZE:-0}" = 1 ]; then
    skip_step smoke "$PYTEST_LOG" "nothing runs kernels"
else
    run_step smoke "$PYTEST_LOG" step_smoke
    [ "${STATUS[smoke]}" = PASS ] || SMOKE_OK=0
fi
# After a failed smoke check the kernel steps are skipped (reported as failed: see below).
gpu_step() {  # gpu_step NAME LOG FUNCTION
    if [ "$SMOKE_OK" = 1 ]; then run_step "$@"; else skip_step "$1" "$2" "the smoke check failed"; fi
}

if [ "${SKIP_TESTS:-0}" = 1 ] || [ "${SKIP_PYTEST:-0}" = 1 ]; then
    skip_step pytest "$PYTEST_LOG" "SKIP_TESTS/SKIP_PYTEST=1"
else
    gpu_step pytest "$PYTEST_LOG" step_pytest
fi

if [ "${SKIP_TESTS:-0}" = 1 ] || [ "${SKIP_CTEST:-0}" = 1 ]; then
    skip_step ctest "$CTEST_LOG" "SKIP_TESTS/SKIP_CTEST=1"
else
    gpu_step ctest "$CTEST_LOG" step_ctest
fi

if [ "${SKIP_TESTS:-0}" = 1 ] || [ "${SKIP_PACKAGE:-0}" = 1 ]; then
    skip_step package "$CTEST_LOG" "SKIP_TESTS/SKIP_PACKAGE=1"
else
    gpu_step package "$CTEST_LOG" step_package
fi

if [ "${SKIP_BENCH:-0}" = 1 ]; then
    skip_step bench "$BENCH_LOG" "SKIP_BENCH=1"
else
    gpu_step bench "$BENCH_LOG" step_bench
fi

SANITIZE_MIN_S=${SANITIZE_MIN_S:-240}
if [ "${SKIP_SANITIZE:-0}" = 1 ]; then
    skip_step sanitize "$SANITIZE_LOG" "SKIP_SANITIZE=1"
elif [ "$BUDGET_S" -gt 0 ] && \
     [ $(( BUDGET_S - ($(date +%s) - START_TS) - RESERVE_S )) -lt "$SANITIZE_MIN_S" ]; then
    skip_step sanitize "$SANITIZE_LOG" "less than ${SANITIZE_MIN_S}s of the time budget left; run it alone: SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1"
else
    # sanitize.sh fits its tools before this deadline (skipping, not failing, what cannot fit).
    if [ "$BUDGET_S" -gt 0 ]; then
        export SANITIZE_DEADLINE_TS=$(( START_TS + BUDGET_S - RESERVE_S - 5 ))
    fi
    gpu_step sanitize "$SANITIZE_LOG" step_sanitize
fi

# ------------------------------------------------------------------------------------------
# Summary (last on stdout; also OUTDIR/summary.txt)
# ------------------------------------------------------------------------------------------

clip() { cut -c1-300; }

note_for() {  # one line of detail for a step
    case $1 in
        env)
            step_part env | { grep -m1 '^GPU ' | sed 's/ (UUID[^)]*)//'; } ;
            step_part env | grep -m1 '^torch ' ;
            step_part env | grep -m1 -o 'release [0-9.]*' | sed 's/^/nvcc /' ;;
        wheels) step_part wheels | grep -m1 '^Version:' | sed 's/^Version:/nvidia-cutlass/' ;;
        build) step_part build | grep -m1 -E '^build\+install took' ;;
        pytest|smoke) step_part "$1" | grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' | tail -n 1 ;;
        ctest) step_part ctest | grep -m1 'GPU_CHECK_STAGE_FAILED' | sed 's/GPU_CHECK_STAGE_FAILED=/failed at: /' ;
               step_part ctest | grep -E 'tests passed|No tests were found' | tail -n 1 ;;
        package) step_part package | grep -m1 'GPU_CHECK_STAGE_FAILED' | sed 's/GPU_CHECK_STAGE_FAILED=/failed at: /' ;
                 step_part package | grep -E '^(mla|sparse)_decode_example: ' | tail -n 2 ;;
        bench) step_part bench | grep -E '^bench_decode: ' | tail -n 1 ;;
        sanitize) step_part sanitize | grep -E '^sanitize: [a-z]+=' | tail -n 1 ;;
    esac 2>/dev/null | paste -sd ';' - | sed 's/;/; /g'
}

details_for() {  # a few lines explaining a failure
    local pat='(FAILED:|error:|Error [0-9]|CMake Error|ERROR:|Error:|Traceback|ModuleNotFoundError|ImportError)'
    case $1 in
        env|wheels)
            step_part "$1" | grep -i -E '(error|fail|not found|no cuda|no devices|sees no|cannot)' \
                | head -n 10
            step_part "$1" | tail -n 2 ;;
        build) step_part build | grep -E "$pat" | head -n 15; step_part build | tail -n 3 ;;
        pytest|smoke) step_part "$1" | grep -E '^(FAILED|ERROR) ' | head -n 20; step_part "$1" | tail -n 1 ;;
        ctest)
            if step_part ctest | grep -q 'GPU_CHECK_STAGE_FAILED=ctest'; then
                step_part ctest | sed -n '/The following tests FAILED/,$p' | head -n 20
            else
                step_part ctest | grep -E "$pat" | head -n 15; step_part ctest | tail -n 3
            fi ;;
        package) step_part package | grep -E "($pat|^FAIL |mismatch)" | head -n 15
                 step_part package | tail -n 3 ;;
        bench) step_part bench | grep -E '(FAIL|ERROR|Traceback|Error:)' | head -n 12
               step_part bench | tail -n 3 ;;
        sanitize) step_part sanitize | grep -E '(^=+ +(Invalid|Race|.*[Hh]azard|Barrier|Program hit|Error)|SUMMARY:|FAIL|Traceback|not found)' \
                      | head -n 15
                  step_part sanitize | tail -n 2 ;;
    esac
}

N_FAIL=0
{
    echo
    echo "========================= GPU check summary ========================="
    echo "repo $ROOT, out $OUTDIR, $(date -u +%Y-%m-%dT%H:%M:%SZ), total $(( $(date +%s) - START_TS )) s"
    printf '%-7s %-12s %6s  %-11s %s\n' step status time log note
    for name in "${STEP_NAMES[@]}"; do
        printf '%-7s %-12s %5ss  %-11s %s\n' "$name" "${STATUS[$name]}" "${SECS[$name]}" \
            "$(basename "${LOGOF[$name]}")" "$(note_for "$name" | clip)"
    done
    for name in "${STEP_NAMES[@]}"; do
        case ${STATUS[$name]} in
            PASS|SKIP*) ;;
            *)
                N_FAIL=$(( N_FAIL + 1 ))
                echo "--- $name (${STATUS[$name]}), from $(basename "${LOGOF[$name]}"):"
                details_for "$name" | clip
                ;;
        esac
    done
    n_files=$(find "$OUTDIR" -type f | wc -l)
    [ "$n_files" -le 8 ] || echo "WARNING: $n_files files in $OUTDIR; expected at most 8"
    if [ "$N_FAIL" -eq 0 ]; then
        echo "overall: PASS (${#STEP_NAMES[@]} steps, none failed); $n_files files in $OUTDIR"
    else
        echo "overall: FAIL ($N_FAIL of ${#STEP_NAMES[@]} steps failed); $n_files files in $OUTDIR"
    fi
} >"$SUMMARY" 2>&1  # a { } group, not a subshell: N_FAIL keeps its count
cat "$SUMMARY"
[ "$N_FAIL" -eq 0 ]
