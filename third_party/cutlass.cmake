# Finds the CUTLASS/CuTe headers. CUTLASS is never vendored in this repository.
#   1. -DCUTLASS_DIR=/path/to/cutlass (or the CUTLASS_DIR environment variable): a CUTLASS
#      checkout or install prefix holding include/cute and include/cutlass.
#   2. Otherwise the headers shipped in the nvidia-cutlass Python package
#      (cutlass_library/source/include), located without importing it.
# Sets FLASH_MLA_CUTLASS_INCLUDE_DIRS.

if(NOT CUTLASS_DIR AND DEFINED ENV{CUTLASS_DIR})
  set(CUTLASS_DIR "$ENV{CUTLASS_DIR}")
endif()

if(CUTLASS_DIR)
  set(_cutlass_root "${CUTLASS_DIR}")
else()
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source') if s else '')"
    OUTPUT_VARIABLE _cutlass_root
    OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _cutlass_rc)
endif()

if(NOT _cutlass_root OR NOT EXISTS "${_cutlass_root}/include/cute/tensor.hpp")
  message(FATAL_ERROR
    "flash-mla: CUTLASS headers not found (looked in '${_cutlass_root}'). "
    "Install them with 'pip install nvidia-cutlass==4.2.0.0' or pass -DCUTLASS_DIR=/path/to/cutlass.")
endif()

set(FLASH_MLA_CUTLASS_INCLUDE_DIRS "${_cutlass_root}/include")
if(EXISTS "${_cutlass_root}/tools/util/include")
  list(APPEND FLASH_MLA_CUTLASS_INCLUDE_DIRS "${_cutlass_root}/tools/util/include")
endif()
message(STATUS "flash-mla: CUTLASS headers: ${FLASH_MLA_CUTLASS_INCLUDE_DIRS}")
