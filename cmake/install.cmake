# Installs the header-only library as a CMake package (included by CMakeLists.txt when
# FLASH_MLA_INSTALL is ON):
#
#   <prefix>/include/flash_mla/...                          the headers
#   <prefix>/share/cmake/flash_mla/flash_mlaConfig.cmake    find_package(flash_mla CONFIG)
#                                 flash_mlaConfigVersion.cmake
#                                 flash_mlaTargets.cmake     the exported flash_mla::flash_mla
#                                 flash_mlaCutlass.cmake     = third_party/cutlass.cmake
#
# The exported target carries the include path of the installed headers, C++/CUDA 17 and the
# CUDA flags; flash_mlaConfig.cmake adds CUTLASS's and CCCL's include folders at find_package
# time (see the comments there). The package is architecture independent: nothing is compiled.

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(FLASH_MLA_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/flash_mla" CACHE STRING
    "Where the flash_mla CMake package files are installed, relative to the prefix")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/flash_mla"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        FILES_MATCHING PATTERN "*.hpp" PATTERN "*.cuh" PATTERN "*.h")

set_target_properties(flash_mla PROPERTIES EXPORT_NAME flash_mla)
install(TARGETS flash_mla EXPORT flash_mlaTargets)
install(EXPORT flash_mlaTargets
        NAMESPACE flash_mla::
        FILE flash_mlaTargets.cmake
        DESTINATION "${FLASH_MLA_INSTALL_CMAKEDIR}")

configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/flash_mlaConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/flash_mlaConfig.cmake"
  INSTALL_DESTINATION "${FLASH_MLA_INSTALL_CMAKEDIR}")
# 0.x: a minor release may change the API, so only the same major.minor is compatible.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/flash_mlaConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMinorVersion
  ARCH_INDEPENDENT)
install(FILES
          "${PROJECT_BINARY_DIR}/flash_mlaConfig.cmake"
          "${PROJECT_BINARY_DIR}/flash_mlaConfigVersion.cmake"
        DESTINATION "${FLASH_MLA_INSTALL_CMAKEDIR}")
install(FILES "${PROJECT_SOURCE_DIR}/third_party/cutlass.cmake"
        DESTINATION "${FLASH_MLA_INSTALL_CMAKEDIR}"
        RENAME flash_mlaCutlass.cmake)
