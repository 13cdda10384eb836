// Fused per-block dot products on CUDA.
//
// Pass 1 (one launch for up to kLargeCap tensors and up to 65535 probe rows): CUDA block
// (chunk c, row r) reduces elements [c*kChunk, (c+1)*kChunk) of its tensor into one
// (dot, sq) partial and records the chunk's block id. The tensor table travels by value in
// the kernel parameters, so there is no host-to-device copy and the launch is CUDA-graph
// capturable. Rows sit on gridDim.y; more rows than the device's grid.y limit take one
// launch per slice of rows.
// Pass 2: one warp per (row, block) binary-searches its chunk range (chunks are sorted by
// block) and sums the partials in chunk order. No atomics: results are deterministic, the
// same bits on every run and whatever the schedule or grid size.
//
// Rounding: not the CPU kernel's bits. The chunks differ (16384 elements here, 32768 on
// the CPU) and nvcc contracts `dot += a * b` into fused multiply-adds (we keep its default
// --fmad=true: one rounding instead of two is more accurate, and nothing here promises
// bit equality of sums across devices). Both kernels stay within the rounding bound the
// tests check. The probes regenerated here are bit-identical to the CPU kernel's, since
// probe_math.h uses only the _rn intrinsics, which nvcc never contracts.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "hutchtrace/checks.h"
#include "hutchtrace/probe_math.h"

namespace hutchtrace {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per partial: 64 per thread
constexpr int kSmallCap = 32;      // 2 KiB of kernel parameters
constexpr int kLargeCap = 384;     // 24 KiB (CUDA >= 12.1 allows 32764 bytes)

enum Mode : int { kExplicit = 0, kRegenRademacher = 1, kRegenGaussian = 2 };

template <int kCap>
struct DotTable {
  DotEntry e[kCap];
  int32_t count;
};
static_assert(sizeof(DotTable<kLargeCap>) <= 32000, "kernel parameter space is limited to 32764 bytes");

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(static_cast<at::opmath_type<scalar_t>>(v));
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void acc_explicit(const scalar_t* __restrict__ w, const scalar_t* __restrict__ z,
                                             int64_t begin, int64_t end, acc_t& dot, acc_t& sq) {
  int64_t i = begin + threadIdx.x;
  // Four independent loads in flight per operand.
  for (; i + 3 * kThreads < end; i += 4 * kThreads) {
    scalar_t wv[4], zv[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      wv[k] = w[i + k * kThreads];
      zv[k] = z[i + k * kThreads];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const acc_t a = to_acc<acc_t>(wv[k]);
      dot += a * to_acc<acc_t>(zv[k]);
      sq += a * a;
    }
  }
  for (; i < end; i += kThreads) {
    const acc_t a = to_acc<acc_t>(w[i]);
    dot += a * to_acc<acc_t>(z[i]);
    sq += a * a;
  }
}

// One Philox call per group of four global elements; the probe is cast to w's dtype
// first, exactly like the probe the explicit path would read.
template <typename scalar_t, typename acc_t, int kKind>
__device__ __forceinline__ void acc_regen(const scalar_t* __restrict__ w, int64_t begin, int64_t end,
                                          uint64_t offset, uint64_t seed, uint64_t probe, acc_t& dot, acc_t& sq) {
  const uint64_t g_first = (offset + begin) >> 2;
  const uint64_t g_last = (offset + end - 1) >> 2;
  for (uint64_t g = g_first + threadIdx.x; g <= g_last; g += kThreads) {
    double v[4];
    probe_values4<kKind>(seed, probe, g, v);
    const int64_t base = static_cast<int64_t>(4 * g) - static_cast<int64_t>(offset);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = base + l;
      if (e >= begin && e < end) {
        const acc_t a = to_acc<acc_t>(w[e]);
        dot += a * to_acc<acc_t>(probe_cast<scalar_t>(v[l]));
        sq += a * a;
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int kMode>
__device__ __forceinline__ void acc_chunk(const DotEntry& e, int64_t r, int64_t begin, int64_t end, uint64_t seed,
                                          uint64_t probe, acc_t& dot, acc_t& sq) {
  const scalar_t* w = static_cast<const scalar_t*>(e.w) + r * e.w_stride;
  if (kMode == kExplicit) {
    const scalar_t* z = static_cast<const scalar_t*>(e.z) + r * e.z_stride;
    acc_explicit<scalar_t, acc_t>(w, z, begin, end, dot, sq);
  } else {
    constexpr int kKind = kMode == kRegenGaussian ? kGaussian : kRademacher;
    acc_regen<scalar_t, acc_t, kKind>(w, begin, end, static_cast<uint64_t>(e.offset), seed,
                                      probe + static_cast<uint64_t>(r), dot, sq);
  }
}

template <typename acc_t, int kMode, int kCap>
__global__ void __launch_bounds__(kThreads)
    block_dot_partial_kernel(const DotTable<kCap> tab, int64_t chunk_base, int64_t row_base, int64_t num_chunks,
                             uint64_t seed, uint64_t probe, acc_t* __restrict__ pdot, acc_t* __restrict__ psq,
                             int32_t* __restrict__ chunk_block) {
  const int64_t c = chunk_base + blockIdx.x;
  const int64_t r = row_base + blockIdx.y;
  // The entry holding chunk c: the last one with chunk_begin <= c (uniform per block).
  int lo = 0, hi = tab.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.e[mid].chunk_begin <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const DotEntry e = tab.e[lo];
  const int64_t begin = (c - e.chunk_begin) * kChunk;
  const int64_t end = begin + kChunk < e.n ? begin + kChunk : e.n;
  acc_t dot = 0, sq = 0;
  switch (e.dtype) {
    case kFloat32:
      acc_chunk<float, acc_t, kMode>(e, r, begin, end, seed, probe, dot, sq);
      break;
    case kFloat64:
      acc_chunk<double, acc_t, kMode>(e, r, begin, end, seed, probe, dot, sq);
      break;
    case kFloat16:
      acc_chunk<c10::Half, acc_t, kMode>(e, r, begin, end, seed, probe, dot, sq);
      break;
    default:
      acc_chunk<c10::BFloat16, acc_t, kMode>(e, r, begin, end, seed, probe, dot, sq);
      break;
  }
  cuda::block_sum2<kThreads>(dot, sq);
  if (threadIdx.x == 0) {
    pdot[r * num_chunks + c] = dot;
    psq[r * num_chunks + c] = sq;
    if (r == 0) chunk_block[c] = e.block;
  }
}

// First index in the sorted chunk_block[0, n) whose value is >= key.
__device__ __forceinline__ int64_t lower_bound(const int32_t* __restrict__ a, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(a[mid]) < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    block_dot_reduce_kernel(const acc_t* __restrict__ pdot, const acc_t* __restrict__ psq,
                            const int32_t* __restrict__ chunk_block, int64_t num_chunks, int64_t rows,
                            int64_t num_blocks, acc_t* __restrict__ out_dot, acc_t* __restrict__ out_sq) {
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / cuda::kWarp);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / cuda::kWarp;
  for (int64_t wid = first; wid < rows * num_blocks; wid += warps) {  // uniform per warp
    const int64_t r = wid / num_blocks;
    const int64_t b = wid - r * num_blocks;
    const int64_t lo = lower_bound(chunk_block, num_chunks, b);
    const int64_t hi = lower_bound(chunk_block, num_chunks, b + 1);
    const acc_t* pd = pdot + r * num_chunks;
    const acc_t* ps = psq + r * num_chunks;
    acc_t d = 0, s = 0;
    for (int64_t c = lo + lane; c < hi; c += cuda::kWarp) {
      d += pd[c];
      s += ps[c];
    }
    d = cuda::warp_sum(d);
    s = cuda::warp_sum(s);
    if (lane == 0) {
      out_dot[wid] = d;
      out_sq[wid] = s;
    }
  }
}

template <typename acc_t, int kCap>
void launch_partials(const BlockPlan& plan, int mode, uint64_t seed, uint64_t probe, acc_t* pdot, acc_t* psq,
                     int32_t* chunk_block, cudaStream_t stream) {
  const size_t T = plan.entries.size();
  const int64_t max_rows = cuda::max_grid_y();
  for (size_t g0 = 0; g0 < T; g0 += kCap) {
    const size_t g1 = std::min(T, g0 + kCap);
    DotTable<kCap> tab{};
    tab.count = static_cast<int32_t>(g1 - g0);
    for (size_t k = g0; k < g1; ++k) tab.e[k - g0] = plan.entries[k];
    const int64_t c0 = plan.entries[g0].chunk_begin;
    const int64_t c1 = g1 < T ? plan.entries[g1].chunk_begin : plan.num_chunks;
    TORCH_CHECK_VALUE(c1 - c0 <= std::numeric_limits<int32_t>::max(), "block_dot: too many elements for one launch");
    for (int64_t r0 = 0; r0 < plan.rows; r0 += max_rows) {
      const dim3 grid(static_cast<unsigned>(c1 - c0), static_cast<unsigned>(std::min(max_rows, plan.rows - r0)));
      switch (mode) {
        case kExplicit:
          block_dot_partial_kernel<acc_t, kExplicit, kCap>
              <<<grid, kThreads, 0, stream>>>(tab, c0, r0, plan.num_chunks, seed, probe, pdot, psq, chunk_block);
          break;
        case kRegenRademacher:
          block_dot_partial_kernel<acc_t, kRegenRademacher, kCap>
              <<<grid, kThreads, 0, stream>>>(tab, c0, r0, plan.num_chunks, seed, probe, pdot, psq, chunk_block);
          break;
        default:
          block_dot_partial_kernel<acc_t, kRegenGaussian, kCap>
              <<<grid, kThreads, 0, stream>>>(tab, c0, r0, plan.num_chunks, seed, probe, pdot, psq, chunk_block);
          break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

template <typename acc_t>
void run_plan(const BlockPlan& plan, int mode, uint64_t seed, uint64_t probe, at::Tensor& dots, at::Tensor& sqs) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = plan.num_chunks;  // > 0 (run() handles the all-empty case)
  const auto opts = dots.options();
  // Temporaries come from the caching allocator (a graph's private pool under capture).
  at::Tensor partial = at::empty({2, plan.rows, C}, opts);
  at::Tensor chunk_block = at::empty({C}, opts.dtype(at::kInt));
  acc_t* pdot = partial.data_ptr<acc_t>();
  acc_t* psq = pdot + plan.rows * C;
  if (plan.entries.size() <= static_cast<size_t>(kSmallCap)) {
    launch_partials<acc_t, kSmallCap>(plan, mode, seed, probe, pdot, psq, chunk_block.data_ptr<int32_t>(), stream);
  } else {
    launch_partials<acc_t, kLargeCap>(plan, mode, seed, probe, pdot, psq, chunk_block.data_ptr<int32_t>(), stream);
  }
  const int64_t outputs = plan.rows * plan.num_blocks;
  const int64_t blocks = cuda::grid_for(outputs * cuda::kWarp, kThreads);
  block_dot_reduce_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      pdot, psq, chunk_block.data_ptr<int32_t>(), C, plan.rows, plan.num_blocks, dots.data_ptr<acc_t>(),
      sqs.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> run(const BlockPlan& plan, int mode, uint64_t seed, uint64_t probe,
                                       const at::Device& device, const char* name) {
  TORCH_CHECK_VALUE(device.is_cuda(), name, ": expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().dtype(plan.acc).device(device);
  at::Tensor dots = at::empty(plan.out_shape, opts);
  at::Tensor sqs = at::empty(plan.out_shape, opts);
  if (plan.rows == 0 || plan.num_blocks == 0) return {dots, sqs};
  if (plan.num_chunks == 0) {  // every tensor is empty: all sums are 0, nothing to launch
    dots.zero_();
    sqs.zero_();
    return {dots, sqs};
  }
  if (plan.acc == at::kDouble) {
    run_plan<double>(plan, mode, seed, probe, dots, sqs);
  } else {
    run_plan<float>(plan, mode, seed, probe, dots, sqs);
  }
  return {dots, sqs};
}

std::tuple<at::Tensor, at::Tensor> block_dot_cuda(at::TensorList w, at::TensorList z, at::IntArrayRef block_index,
                                                  int64_t num_blocks, bool batched,
                                                  std::optional<at::ScalarType> acc_dtype) {
  const BlockPlan plan = make_block_plan(w, std::optional<at::TensorList>(z), {}, block_index, num_blocks, batched,
                                         acc_dtype, kChunk, "block_dot");
  return run(plan, kExplicit, 0, 0, w[0].device(), "block_dot");
}

std::tuple<at::Tensor, at::Tensor> block_dot_regen_cuda(at::TensorList w, at::IntArrayRef offsets,
                                                        at::IntArrayRef block_index, int64_t num_blocks, int64_t seed,
                                                        int64_t probe, int64_t kind, bool batched,
                                                        std::optional<at::ScalarType> acc_dtype) {
  check_regen_args(seed, probe, kind);
  const BlockPlan plan = make_block_plan(w, std::nullopt, offsets, block_index, num_blocks, batched, acc_dtype,
                                         kChunk, "block_dot_regen");
  check_regen_rows(probe, plan.rows);
  const int mode = kind == kGaussian ? kRegenGaussian : kRegenRademacher;
  return run(plan, mode, static_cast<uint64_t>(seed), static_cast<uint64_t>(probe), w[0].device(),
             "block_dot_regen");
}

}  // namespace

TORCH_LIBRARY_IMPL(hutchtrace, CUDA, m) {
  m.impl("block_dot", &block_dot_cuda);
  m.impl("block_dot_regen", &block_dot_regen_cuda);
}

}  // namespace hutchtrace
