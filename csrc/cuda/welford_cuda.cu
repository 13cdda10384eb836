// Streaming per-block statistics on CUDA (formulas in hutchtrace/welford.h).
// The count is read on the device and advanced by a stream-ordered add afterwards:
// no host synchronisation, graph capturable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "hutchtrace/checks.h"
#include "hutchtrace/welford.h"

namespace hutchtrace {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    welford_update_kernel(const int64_t* __restrict__ count, double* __restrict__ mean, double* __restrict__ m2,
                          const scalar_t* __restrict__ x, int64_t rows, int64_t L) {
  const int64_t n0 = *count;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < L; l += stride) {
    WelfordState s{n0, mean[l], m2[l]};
    for (int64_t r = 0; r < rows; ++r) welford_update(s, static_cast<double>(x[r * L + l]));
    mean[l] = s.mean;
    m2[l] = s.m2;
  }
}

__global__ void __launch_bounds__(kThreads)
    welford_merge_kernel(const int64_t* __restrict__ count, double* __restrict__ mean, double* __restrict__ m2,
                         const int64_t* __restrict__ count_b, const double* __restrict__ mean_b,
                         const double* __restrict__ m2_b, int64_t L) {
  const int64_t na = *count;
  const int64_t nb = *count_b;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < L; l += stride) {
    WelfordState a{na, mean[l], m2[l]};
    welford_combine(a, WelfordState{nb, mean_b[l], m2_b[l]});
    mean[l] = a.mean;
    m2[l] = a.m2;
  }
}

void welford_update_cuda(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& x_in) {
  const int64_t L = check_welford_state(count, mean, m2, "welford_update_");
  TORCH_CHECK_VALUE(mean.is_cuda() && x_in.device() == mean.device(), "welford_update_: expected CUDA tensors on ",
              mean.device());
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "welford_update_: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE((x_in.dim() == 1 || x_in.dim() == 2) && x_in.size(-1) == L,
              "welford_update_: x must have shape (L,) or (B, L) with L = ", L, ", got ", x_in.sizes());
  const c10::cuda::CUDAGuard guard(mean.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.dim() == 2 ? x.size(0) : 1;
  if (L > 0 && rows > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = cuda::grid_for(L, kThreads);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "welford_update_", [&] {
      welford_update_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          count.data_ptr<int64_t>(), mean.data_ptr<double>(), m2.data_ptr<double>(), x.data_ptr<scalar_t>(), rows,
          L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  count.add_(rows);  // after the kernel has read the old count (same stream)
}

void welford_merge_cuda(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& count_b,
                        const at::Tensor& mean_b_in, const at::Tensor& m2_b_in) {
  const int64_t L = check_welford_merge_args(count, mean, m2, count_b, mean_b_in, m2_b_in);
  TORCH_CHECK_VALUE(mean.is_cuda() && count_b.device() == mean.device() && mean_b_in.device() == mean.device() &&
                  m2_b_in.device() == mean.device(),
              "welford_merge_: expected CUDA tensors on ", mean.device());
  const c10::cuda::CUDAGuard guard(mean.device());
  const at::Tensor mean_b = mean_b_in.contiguous();
  const at::Tensor m2_b = m2_b_in.contiguous();
  if (L > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = cuda::grid_for(L, kThreads);
    welford_merge_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        count.data_ptr<int64_t>(), mean.data_ptr<double>(), m2.data_ptr<double>(), count_b.data_ptr<int64_t>(),
        mean_b.data_ptr<double>(), m2_b.data_ptr<double>(), L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  count.add_(count_b.reshape(count.sizes()));
}

}  // namespace

TORCH_LIBRARY_IMPL(hutchtrace, CUDA, m) {
  m.impl("welford_update_", &welford_update_cuda);
  m.impl("welford_merge_", &welford_merge_cuda);
}

}  // namespace hutchtrace
