// Counter-based probes on CUDA: one thread per group of 4 global elements (one Philox
// call), grid-stride. Bit-identical to the CPU kernel and the reference (probe_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "hutchtrace/checks.h"
#include "hutchtrace/probe_math.h"

namespace hutchtrace {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename scalar_t, int kKind>
__global__ void __launch_bounds__(kThreads)
    fill_probes_kernel(scalar_t* __restrict__ out, int64_t rows, int64_t n, int64_t groups, uint64_t g_first,
                       uint64_t seed, uint64_t probe, uint64_t offset) {
  const int64_t total = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / groups;
    const uint64_t g = g_first + static_cast<uint64_t>(idx - r * groups);
    double v[4];
    probe_values4<kKind>(seed, probe + static_cast<uint64_t>(r), g, v);
    scalar_t* row = out + r * n;
    const int64_t base = static_cast<int64_t>(4 * g) - static_cast<int64_t>(offset);
    if (base >= 0 && base + 4 <= n && (reinterpret_cast<uintptr_t>(row + base) % sizeof(Vec4<scalar_t>)) == 0) {
      Vec4<scalar_t> pack;
#pragma unroll
      for (int l = 0; l < 4; ++l) pack.v[l] = probe_cast<scalar_t>(v[l]);
      *reinterpret_cast<Vec4<scalar_t>*>(row + base) = pack;
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t j = base + l;
        if (j >= 0 && j < n) row[j] = probe_cast<scalar_t>(v[l]);
      }
    }
  }
}

template <int kKind>
void probes_cuda(at::Tensor& out, int64_t seed, int64_t probe, int64_t offset, const char* name) {
  const ProbeShape s = check_probe_args(out, seed, probe, offset, name);
  TORCH_CHECK_VALUE(out.is_cuda(), name, ": expected a CUDA tensor");
  if (s.rows == 0 || s.n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const uint64_t off = static_cast<uint64_t>(offset);
  const uint64_t g_first = off >> 2;
  const int64_t groups = static_cast<int64_t>(((off + s.n - 1) >> 2) - g_first) + 1;
  const int64_t blocks = cuda::grid_for(s.rows * groups, kThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hutchtrace_probes", [&] {
    fill_probes_kernel<scalar_t, kKind><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), s.rows, s.n, groups, g_first, static_cast<uint64_t>(seed),
        static_cast<uint64_t>(probe), off);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rademacher_cuda(at::Tensor out, int64_t seed, int64_t probe, int64_t offset) {
  probes_cuda<kRademacher>(out, seed, probe, offset, "rademacher_");
}

void gaussian_cuda(at::Tensor out, int64_t seed, int64_t probe, int64_t offset) {
  probes_cuda<kGaussian>(out, seed, probe, offset, "gaussian_");
}

}  // namespace

TORCH_LIBRARY_IMPL(hutchtrace, CUDA, m) {
  m.impl("rademacher_", &rademacher_cuda);
  m.impl("gaussian_", &gaussian_cuda);
}

}  // namespace hutchtrace
