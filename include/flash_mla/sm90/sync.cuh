// Synchronisation primitives the Hopper kernels share: named barriers, and the fence that makes
// generic-proxy shared-memory writes visible to wgmma and the copy engine.
#pragma once

#include <cstdint>

namespace flash_mla::sm90 {

/// Hardware named barrier `id` over `threads` threads (a multiple of 32; 0 is __syncthreads).
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

/// Generic-proxy shared-memory writes (st.shared, cp.async) become visible to wgmma.
__device__ __forceinline__ void fence_to_async_proxy() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

/// An arrival on the mbarrier `bar` once every cp.async this thread issued so far has landed
/// (counted in the barrier's expected arrivals: .noinc).
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
               : "memory");
}

/// Waits for the grid this kernel was launched as a programmatic dependent of (launch_kernel with
/// programmatic = true: the set-up before this call overlaps that grid's tail); nothing in global
/// memory may be read or written before it.
__device__ __forceinline__ void wait_for_prior_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

}  // namespace flash_mla::sm90
