// Small device helpers shared by the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace hutchtrace {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // lane 0 holds the sum, in a fixed order
}

// Sum of (a, b) over a block of kThreads threads; thread 0 gets the result.
// Fixed shape (shuffle tree, then warp 0 over the warp sums), hence deterministic.
// Every thread of the block must call it (it has barriers). It may be called several
// times in one kernel: the closing barrier keeps a later call from overwriting the warp
// sums before warp 0 has read them.
template <int kThreads, typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  static_assert(kThreads % kWarp == 0 && kThreads / kWarp <= kWarp, "bad block size");
  __shared__ T sa[kThreads / kWarp];
  __shared__ T sb[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / kWarp ? sa[lane] : T(0);
    b = lane < kThreads / kWarp ? sb[lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
  __syncthreads();
}

// Blocks for a grid-stride loop over `work` items: enough to fill the device, no more.
// (Only a device attribute query: no stream work, safe during graph capture. ATen's
// CUDAContext.h is avoided on purpose: it needs the cuBLAS/cuSPARSE headers.)
inline int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

// The device's grid.y limit (65535 on every GPU so far; asked, not assumed, so that the
// emulator of the tests can lower it and exercise the launch splitting at small sizes).
inline int64_t max_grid_y() {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxGridDimY, device));
  return limit > 0 ? limit : 65535;
}

inline int64_t grid_for(int64_t work, int threads, int blocks_per_sm = 8) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * blocks_per_sm;
  return std::max<int64_t>(1, std::min(needed, cap));
}

}  // namespace cuda
}  // namespace hutchtrace
