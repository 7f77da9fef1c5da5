// Optional cycle trace of the seesaw main loop, for performance work only: compiled in with
// -DFLASH_MLA_SM90_TRACE (benchmarks/cpp/bench_sm90.cu reads it back), empty otherwise. The
// first thread of each warpgroup of CTA (0, 0, 0) stamps clock64() at the events below for the
// first kTracePairs page pairs; both warpgroups share the SM, so their stamps compare directly.
#pragma once

#include <cstdint>

namespace flash_mla::sm90 {

/// Events of one page pair, per warpgroup (see mainloop.cuh for where each is stamped).
enum TraceEvent : int {
  kTracePairStart = 0,
  kTraceMaxPublished,  // this warpgroup's maxima folded and published (wg1: after kMax0Ready)
  kTraceOwnPvIssued,   // P V from registers issued (wg1: P1 stored first)
  kTraceOtherReady,    // the other warpgroup's hand-off waited for (wg0: kMax1Ready, wg1: kP0Ready)
  kTracePStored,       // wg0: P0 stored; wg1: remote P V issued
  kTraceOwnPvDone,     // wg0: P0 V0_L done; wg1: P1 V1_R done
  kTraceRemoteReady,   // wg0: kP1Ready waited for; wg1: P0 V0_R done
  kTraceSFirstIssued,  // first part of the next S issued, barrier waits included (wg0: blocks 0-3, wg1: 4-7)
  kTraceRefillIssued,  // wg0: V1_L read, kv[1] refill issued (wg1: not stamped)
  kTraceSIssued,       // all of the next S issued
  kTracePairEnd,       // the next S done
  kTraceEvents
};

/// Events of one request segment, stamped by thread 0 (see kernel.cuh): where a segment's fixed
/// cost goes.
enum TraceSegmentEvent : int {
  kSegTop = 0,     // loop top, before the barrier that ends the previous segment's use of shared memory
  kSegReady,       // Q and the first pages' loads waited for (cp.async) and the barrier passed
  kSegFirstS,      // S of the first pair done
  kSegPairsDone,   // every pair of the segment done
  kSegSummed,      // row sums exchanged (barrier passed)
  kSegStored,      // output (final or partial) stores issued
  kSegEvents
};

constexpr int kTracePairs = 96;
constexpr int kTraceSegCtas = 64;   // CTAs (x = y = 0, z < this) whose segments are stamped
constexpr int kTraceSegments = 8;   // segments stamped per CTA
constexpr int kTraceCtas = 2048;  // CTAs whose start and end times (globaltimer, ns) are kept

#ifdef FLASH_MLA_SM90_TRACE
__device__ long long trace_clock[2][kTracePairs][kTraceEvents];

/// Global time (ns) at which warpgroup 0 of the first two m-block CTAs of SM part 0 starts each
/// pair: how closely two CTAs that read the same pages keep in step.
__device__ unsigned long long trace_mblock_ns[2][kTracePairs];

__device__ __forceinline__ void trace(int slot, TraceEvent event) {
  const long long now = clock64();
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x % 128 == 0 && slot < kTracePairs) {
    trace_clock[threadIdx.x / 128][slot][event] = now;
  }
  if (event == kTracePairStart && blockIdx.x < 2 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0 &&
      slot < kTracePairs) {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    trace_mblock_ns[blockIdx.x][slot] = ns;
  }
}
__device__ long long trace_seg_clock[kTraceSegCtas][kTraceSegments][kSegEvents];

__device__ __forceinline__ void trace_segment(int segment, TraceSegmentEvent event) {
  const long long now = clock64();
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z < kTraceSegCtas && threadIdx.x == 0 && segment < kTraceSegments) {
    trace_seg_clock[blockIdx.z][segment][event] = now;
  }
}

__device__ unsigned long long trace_cta_ns[kTraceCtas][2];

/// Thread 0 of every CTA stamps the global timer when the CTA starts (end = false) and ends: the
/// spread of the end times shows how well the plan balances the SM parts.
__device__ __forceinline__ void trace_cta(bool end) {
  const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (threadIdx.x == 0 && cta < kTraceCtas) {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    trace_cta_ns[cta][end ? 1 : 0] = ns;
  }
}
#else
__device__ __forceinline__ void trace(int, TraceEvent) {}
__device__ __forceinline__ void trace_segment(int, TraceSegmentEvent) {}
__device__ __forceinline__ void trace_cta(bool) {}
#endif

}  // namespace flash_mla::sm90
