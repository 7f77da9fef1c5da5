// Portability macros shared by headers that are compiled both by nvcc and by a host compiler.
#pragma once

#if defined(__CUDACC__)
#define FLASH_MLA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLASH_MLA_HOST_DEVICE inline
#endif
