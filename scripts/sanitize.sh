#!/usr/bin/env bash
# compute-sanitizer over a small decode workload (tests/sanitize_driver.py): memcheck,
# racecheck and synccheck, each must report nothing. Needs a GPU and the installed package
# (pip install .). Run from anywhere:
#
#     bash scripts/sanitize.sh                     # all three tools
#     SANITIZE_TOOLS="memcheck" bash scripts/sanitize.sh
#
# What runs (see the driver): get_mla_metadata, the input-check kernels (check_inputs=True),
# every decode kernel that runs on the GPU (auto counted once with what it resolves to), the
# combine kernel, on eight small dense cases (split requests, GQA + causal + strided q, 128 heads,
# out-of-range indices that must not be read, 16-token and 256-token pages, an FP8 cache with
# bf16 q and FP8 q with an FP8 cache) and three token-sparse ones (the three cache formats,
# invalid indices, NaN in every unselected slot, a second cache, a split query token; these
# always go through the torch API). Tensors are separate cudaMallocs
# (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so memcheck sees any access past a tensor's end.
# memcheck goes through the torch API with the GPU's own plan (one SM part per SM); racecheck
# and synccheck go through flash_mla.ops with a plan for 8 SMs (a handful of CTAs, all code
# paths, split requests included): racecheck is the slowest tool by far.
#
# Exit status: 0 when every tool ran clean (or was skipped for time), 1 when a tool reported
# something, failed or timed out, 2 when compute-sanitizer or a GPU is missing.
#
# Environment knobs:
#     SANITIZE_TOOLS="memcheck racecheck synccheck"   the tools, in order (initcheck also works)
#     SANITIZE_TIMEOUT_S=150     wall-clock limit of each tool
#     SANITIZE_DEADLINE_TS=N     epoch seconds by which everything must be done (set by
#                                gpu_check.sh): a tool that cannot get 30 s is skipped
#     SANITIZE_ARGS_<tool>="..."   driver arguments of a tool (defaults: memcheck "",
#                                racecheck "--cases split,gqa,wide,page16,sparse_v32 --num-sms 8",
#                                synccheck "--num-sms 8"), e.g. SANITIZE_ARGS_memcheck="--cases split"
#     SANITIZE_KERNELS="all"     driver --kernels (e.g. "sm90,sm80_small")
#     COMPUTE_SANITIZER=path     the compute-sanitizer binary (default: PATH, then CUDA dirs)
#     PYTHON=python3             the interpreter holding torch and flash_mla

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

PY=${PYTHON:-python3}
TOOLS=${SANITIZE_TOOLS:-"memcheck racecheck synccheck"}
TIMEOUT_S=${SANITIZE_TIMEOUT_S:-150}
KERNELS=${SANITIZE_KERNELS:-all}

find_sanitizer() {
    local c
    if [ -n "${COMPUTE_SANITIZER:-}" ]; then echo "$COMPUTE_SANITIZER"; return 0; fi
    if command -v compute-sanitizer >/dev/null 2>&1; then command -v compute-sanitizer; return 0; fi
    for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
             /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
             "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")/compute-sanitizer"; do
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}

CS=$(find_sanitizer) || { echo "sanitize: compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2; }
echo "sanitize: $CS ($("$CS" --version 2>/dev/null | grep -m1 -o 'Version [0-9.]*' || echo 'version ?'))"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "sanitize: torch sees no CUDA device"
    exit 2
fi

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export PYTHONUNBUFFERED=1

declare -A RESULT=()
ORDER=()
FAILED=0
LOG=$(mktemp "${TMPDIR:-/tmp}/sanitize.XXXXXX.log")
trap 'rm -f "$LOG"' EXIT

for tool in $TOOLS; do
    ORDER+=("$tool")
    limit=$TIMEOUT_S
    if [ -n "${SANITIZE_DEADLINE_TS:-}" ]; then
        left=$(( SANITIZE_DEADLINE_TS - $(date +%s) - 5 ))
        [ "$left" -lt "$limit" ] && limit=$left
        if [ "$limit" -lt 30 ]; then
            echo "sanitize: $tool skipped: only ${left}s left before the deadline"
            RESULT[$tool]="SKIP(time)"
            continue
        fi
    fi
    args_var="SANITIZE_ARGS_$tool"
    case $tool in
        racecheck) default_args="--cases split,gqa,wide,page16,sparse_v32 --num-sms 8" ;;
        synccheck) default_args="--num-sms 8" ;;
        *) default_args="" ;;
    esac
    # shellcheck disable=SC2206 # a word list on purpose
    driver_args=(--kernels "$KERNELS" ${!args_var-$default_args})
    tool_args=(--tool "$tool" --error-exitcode 86 --report-api-errors no)
    echo
    echo "=== sanitize: $tool (limit ${limit}s): $CS ${tool_args[*]} $PY tests/sanitize_driver.py ${driver_args[*]}"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$CS" "${tool_args[@]}" "$PY" tests/sanitize_driver.py "${driver_args[@]}" \
        2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - t0 ))
    summary=$(grep -E '(ERROR SUMMARY|RACECHECK SUMMARY|HAZARD SUMMARY):' "$LOG" | tail -n 1 | sed 's/^=* *//')
    clean=0
    case $tool in
        racecheck) grep -qE 'RACECHECK SUMMARY: 0 hazard' "$LOG" && clean=1 ;;
        *) grep -qE 'ERROR SUMMARY: 0 errors' "$LOG" && clean=1 ;;
    esac
    if [ "$rc" -eq 0 ] && [ "$clean" -eq 1 ] && grep -q 'sanitize_driver: all cases passed' "$LOG"; then
        RESULT[$tool]="PASS(${secs}s)"
    else
        case $rc in
            124|137) why="timeout" ;;
            86) why="reports" ;;
            0) why="no clean summary" ;;
            *) why="rc=$rc" ;;
        esac
        RESULT[$tool]="FAIL(${why},${secs}s)"
        FAILED=1
    fi
    echo "sanitize: $tool -> ${RESULT[$tool]}: ${summary:-no summary line}"
done

line="sanitize:"
for tool in "${ORDER[@]}"; do line+=" $tool=${RESULT[$tool]}"; done
echo
echo "$line"
exit $FAILED
