# Finds the CUTLASS/CuTe headers. CUTLASS is never vendored in this repository.
#
# The same file serves the source tree (CMakeLists.txt includes it) and the installed CMake
# package (installed as flash_mlaCutlass.cmake; flash_mlaConfig.cmake includes it), so that
# find_package(flash_mla) looks for CUTLASS the same way the build did. Places, in order:
#   1. -DCUTLASS_DIR=/path/to/cutlass (or the CUTLASS_DIR environment variable): a CUTLASS
#      checkout or install prefix holding include/cute and include/cutlass. When it is set
#      and wrong, that is an error (no silent fallback).
#   2. Hint roots passed by the caller: the installed package passes the root flash-mla was
#      configured with, used when it still exists.
#   3. The headers shipped in the nvidia-cutlass Python package
#      (cutlass_library/source/include), located with the Python 3 interpreter without
#      importing it.
#
# flash_mla_find_cutlass(<root_var> <include_dirs_var> <error_var> [HINTS dir...]) sets
# <root_var> to the CUTLASS root and <include_dirs_var> to its include folders
# (<root>/include, plus <root>/tools/util/include when present), or both to "" and
# <error_var> to the reason. It never stops the configure itself.

include_guard(GLOBAL)

function(flash_mla_find_cutlass root_var include_dirs_var error_var)
  cmake_parse_arguments(PARSE_ARGV 3 arg "" "" "HINTS")
  set(_root "")
  set(_error "")
  set(_tried "")

  set(_explicit "")
  if(CUTLASS_DIR)
    set(_explicit "${CUTLASS_DIR}")
  elseif(DEFINED ENV{CUTLASS_DIR} AND NOT "$ENV{CUTLASS_DIR}" STREQUAL "")
    set(_explicit "$ENV{CUTLASS_DIR}")
  endif()

  if(_explicit)
    if(EXISTS "${_explicit}/include/cute/tensor.hpp")
      set(_root "${_explicit}")
    else()
      set(_error "CUTLASS_DIR='${_explicit}' does not hold include/cute/tensor.hpp")
    endif()
  else()
    foreach(_hint IN LISTS arg_HINTS)
      list(APPEND _tried "${_hint}")
      if(_hint AND EXISTS "${_hint}/include/cute/tensor.hpp")
        set(_root "${_hint}")
        break()
      endif()
    endforeach()
    if(NOT _root)
      find_package(Python3 COMPONENTS Interpreter QUIET)
      if(Python3_Interpreter_FOUND)
        execute_process(
          COMMAND "${Python3_EXECUTABLE}" -c
            "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source') if s else '')"
          OUTPUT_VARIABLE _py_root
          OUTPUT_STRIP_TRAILING_WHITESPACE
          RESULT_VARIABLE _py_rc
          ERROR_QUIET)
        if(_py_rc EQUAL 0 AND _py_root AND EXISTS "${_py_root}/include/cute/tensor.hpp")
          set(_root "${_py_root}")
        else()
          list(APPEND _tried "nvidia-cutlass package of ${Python3_EXECUTABLE}")
        endif()
      else()
        list(APPEND _tried "nvidia-cutlass package (no Python 3 interpreter found)")
      endif()
    endif()
    if(NOT _root)
      list(JOIN _tried "', '" _tried_str)
      set(_error "CUTLASS headers not found (tried '${_tried_str}')")
    endif()
  endif()

  set(_includes "")
  if(_root)
    set(_includes "${_root}/include")
    if(EXISTS "${_root}/tools/util/include")
      list(APPEND _includes "${_root}/tools/util/include")
    endif()
    set(_error "")
  else()
    string(APPEND _error ". Install the headers with 'pip install nvidia-cutlass==4.2.0.0' "
                         "or pass -DCUTLASS_DIR=/path/to/cutlass.")
  endif()
  set(${root_var} "${_root}" PARENT_SCOPE)
  set(${include_dirs_var} "${_includes}" PARENT_SCOPE)
  set(${error_var} "${_error}" PARENT_SCOPE)
endfunction()
