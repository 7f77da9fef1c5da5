#!/usr/bin/env bash
# A/B of the Python package across commits: build one wheel per git ref (no GPU needed, nvcc is),
# then run a benchmark command against each build in turn, the builds alternating within each
# round, so that every variant sees the same GPU state (clocks, temperature, power) in one run.
#
#     bash scripts/ab_builds.sh build DIR REF [REF ...]
#     bash scripts/ab_builds.sh run DIR [ROUNDS] -- COMMAND [ARGS ...]
#
# build: for each REF (a branch, tag or commit of this repository) a temporary worktree is built
#        with `pip wheel` and the wheel unpacked into DIR/<ref, '/' as '_'>. Knobs: PYTHON (the
#        interpreter of the machine that will run the builds: its version picks the wheel's ABI;
#        default python3), FLASH_MLA_CUDA_ARCHS (default 90a), CMAKE_BUILD_PARALLEL_LEVEL.
# run:   ROUNDS (default 2) times, for each build in DIR (name order), COMMAND runs with
#        PYTHONPATH=DIR/<build>; each output line is prefixed with the build's name. Use a command
#        whose rows are short, e.g.
#            bash scripts/ab_builds.sh run build/ab 2 -- python benchmarks/bench_sparse.py \
#                --rows v32-b128-h128-s2-k2048 --kernels sm90 --reps 20
#        DIR can be carried to a GPU machine without network: nothing is built there.
# Exit status: 1 if a build or a command failed, else 0.
set -uo pipefail

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1 dir=$2
shift 2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
status=0

case $mode in
build)
  [ $# -ge 1 ] || usage
  py=${PYTHON:-python3}
  mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
  for ref in "$@"; do
    name=${ref//\//_}
    work=$(mktemp -d) wheels=$(mktemp -d)
    if ! git -C "$root" worktree add -q --detach "$work/src" "$ref"; then
      echo "ab_builds: cannot check out $ref" >&2; status=1; continue
    fi
    echo "== $ref -> $dir/$name"
    if (cd "$work/src" && CMAKE_ARGS="-DFLASH_MLA_CUDA_ARCHS=${FLASH_MLA_CUDA_ARCHS:-90a} ${CMAKE_ARGS:-}" \
          "$py" -m pip wheel -q --no-build-isolation --no-deps . -w "$wheels" > "$work/build.log" 2>&1); then
      rm -rf "${dir:?}/$name" && mkdir -p "$dir/$name" && (cd "$dir/$name" && unzip -q "$wheels"/*.whl) \
        || { echo "ab_builds: cannot unpack the wheel of $ref" >&2; status=1; }
    else
      echo "ab_builds: build of $ref failed:" >&2; tail -20 "$work/build.log" >&2; status=1
    fi
    git -C "$root" worktree remove --force "$work/src"
    rm -rf "$work" "$wheels"
  done
  ;;
run)
  rounds=2
  if [ $# -ge 1 ] && [ "$1" != "--" ]; then rounds=$1; shift; fi
  [ $# -ge 2 ] && [ "$1" = "--" ] || usage
  shift
  builds=()
  for b in "$dir"/*/; do [ -d "$b/flash_mla" ] && builds+=("$(basename "$b")"); done
  [ ${#builds[@]} -gt 0 ] || { echo "ab_builds: no builds in $dir" >&2; exit 2; }
  dir=$(cd "$dir" && pwd)
  cd "$root" || exit 2
  for ((r = 1; r <= rounds; ++r)); do
    for b in "${builds[@]}"; do
      PYTHONPATH="$dir/$b${PYTHONPATH:+:$PYTHONPATH}" "$@" 2>&1 | sed "s|^|[$b r$r] |"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
  done
  ;;
*) usage ;;
esac
exit $status
