#!/usr/bin/env bash
# The project's test command: the Python suite (GPU tests skip without a GPU) and the C++
# tests through CTest. Run from the repository root after `pip install ".[test]"` (README.md).
#   BUILD_DIR   CMake build folder for the C++ tests (default build/cpp)
#   PYTEST_ARGS extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build/cpp}

status=0
python3 -m pytest -q tests/python ${PYTEST_ARGS:-} || status=$?
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
{ cmake -S . -B "$build_dir" "${generator[@]}" -DFLASH_MLA_BUILD_TESTS=ON &&
  cmake --build "$build_dir" --parallel &&
  ctest --test-dir "$build_dir" --output-on-failure; } || status=$?
exit $status
