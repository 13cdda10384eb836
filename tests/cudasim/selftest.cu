// Kernels that exercise the emulator itself (tests/kernels/test_cudasim.py): warp operations,
// barriers, shared-memory poisoning, schedules, and hutchtrace's block_sum2 called twice.
// Plain CUDA: nvcc would compile this file too.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "cuda_utils.cuh"

namespace {

// out[tid][0..5]: shfl_down 1, shfl_up 2, shfl_xor 5, shfl from lane 3, shfl_down 3 within
// 8-lane segments, shfl_xor 1 of a double.
__global__ void shuffles(float* out) {
  const int t = threadIdx.x;
  const float v = static_cast<float>(t);
  float* o = out + 6 * t;
  o[0] = __shfl_down_sync(0xffffffffu, v, 1);
  o[1] = __shfl_up_sync(0xffffffffu, v, 2);
  o[2] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[3] = __shfl_sync(0xffffffffu, v, 3);
  o[4] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[5] = static_cast<float>(__shfl_xor_sync(0xffffffffu, static_cast<double>(v) + 0.5, 1));
}

// out[tid][0..3]: ballot, any, all of (lane % 3 == 0), and __syncthreads_count of it.
__global__ void votes(float* out) {
  const int t = threadIdx.x;
  const bool p = (t % 32) % 3 == 0;
  float* o = out + 4 * t;
  o[0] = static_cast<float>(__ballot_sync(0xffffffffu, p));
  o[1] = static_cast<float>(__any_sync(0xffffffffu, p));
  o[2] = static_cast<float>(__all_sync(0xffffffffu, p));
  o[3] = static_cast<float>(__syncthreads_count(p));
}

// Two reductions in a row through the shared helper: [sum(x), sum(2x), sum(x^2), sum(3)].
__global__ void block_sum2_twice(const double* x, double* out) {
  double a = x[threadIdx.x], b = 2 * x[threadIdx.x];
  hutchtrace::cuda::block_sum2<256>(a, b);
  double c = x[threadIdx.x] * x[threadIdx.x], d = 3;
  hutchtrace::cuda::block_sum2<256>(c, d);
  if (threadIdx.x == 0) {
    out[4 * blockIdx.x + 0] = a;
    out[4 * blockIdx.x + 1] = b;
    out[4 * blockIdx.x + 2] = c;
    out[4 * blockIdx.x + 3] = d;
  }
}

// Reads shared memory before any thread of the block wrote it (poisoned: NaN), then
// writes it: without poisoning between blocks the next block would read this value.
__global__ void uninitialised_shared(double* out) {
  __shared__ double s[64];
  if (threadIdx.x == 0) {
    out[blockIdx.x] = s[5];
    s[5] = blockIdx.x;
  }
}

// Each block reads its predecessor's slot before writing its own: the result depends on
// the order in which blocks run (a cross-block race, legal CUDA but order-dependent).
__global__ void block_order_race(float* out) {
  if (threadIdx.x == 0) {
    const int b = blockIdx.x;
    out[b] = (b > 0 ? out[b - 1] : 0.0f) + 1.0f;
  }
}

// Grid-stride loop sized like the hutchtrace kernels: out[i] = number of blocks.
__global__ void grid_stride(float* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<float>(gridDim.x);
  }
}

__global__ void atomics(int* counter, double* sum) {
  atomicAdd(counter, 1);
  atomicAdd(sum, 0.5);
}

// ---- defects the emulator must report (never hang)
__global__ void barrier_in_branch(float* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit(float* out) {
  if (threadIdx.x >= 100) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void two_barriers(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_in_branch(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_absent_lane(float* out) {  // launched with 48 threads
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

__global__ void shuffle_exited_lane(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

__global__ void shuffle_outside_mask(float* out) {
  if (threadIdx.x % 32 < 16) {
    out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, static_cast<float>(threadIdx.x), 8);
  }
}

__global__ void shuffle_then_barrier(float* out) {
  if (threadIdx.x == 5) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
  }
}

void selftest(std::string name, at::Tensor out, int64_t threads, int64_t blocks) {
  TORCH_CHECK_VALUE(out.is_contiguous(), "selftest: out must be contiguous");
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(static_cast<unsigned>(threads));
  if (name == "shuffles") {
    shuffles<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "votes") {
    votes<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "block_sum2_twice") {
    // out: (blocks, 4 + 256) doubles, the inputs in the last 256 columns of row 0
    at::Tensor x = out.narrow(1, 4, 256).select(0, 0).contiguous();
    at::Tensor res = at::empty({blocks, 4}, out.options());
    block_sum2_twice<<<grid, block>>>(x.data_ptr<double>(), res.data_ptr<double>());
    out.narrow(1, 0, 4).copy_(res);
  } else if (name == "uninitialised_shared") {
    uninitialised_shared<<<grid, block>>>(out.data_ptr<double>());
  } else if (name == "block_order_race") {
    block_order_race<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "grid_stride") {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int64_t n = out.numel();
    const int64_t need = (n + threads - 1) / threads;
    const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(need, 8 * static_cast<int64_t>(sms)));
    grid_stride<<<static_cast<unsigned>(nb), block>>>(out.data_ptr<float>(), n);
  } else if (name == "grid_2d") {  // blocks along y: checked against the grid.y limit
    at::Tensor counter = at::zeros({1}, out.options().dtype(at::kInt));
    atomics<<<dim3(1, static_cast<unsigned>(blocks)), block>>>(counter.data_ptr<int>(), out.data_ptr<double>());
  } else if (name == "atomics") {
    at::Tensor counter = at::zeros({1}, out.options().dtype(at::kInt));
    atomics<<<grid, block>>>(counter.data_ptr<int>(), out.data_ptr<double>());
    out.add_(counter.to(at::kDouble) * 1000);
  } else if (name == "barrier_in_branch") {
    barrier_in_branch<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "barrier_after_exit") {
    barrier_after_exit<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "two_barriers") {
    two_barriers<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "shuffle_in_branch") {
    shuffle_in_branch<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "shuffle_absent_lane") {
    shuffle_absent_lane<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "shuffle_exited_lane") {
    shuffle_exited_lane<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "shuffle_outside_mask") {
    shuffle_outside_mask<<<grid, block>>>(out.data_ptr<float>());
  } else if (name == "shuffle_then_barrier") {
    shuffle_then_barrier<<<grid, block>>>(out.data_ptr<float>());
  } else {
    TORCH_CHECK_VALUE(false, "selftest: unknown case ", name);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hutchtrace_emu, m) {
  m.def("_cudasim_selftest(str name, Tensor(a!) out, int threads, int blocks) -> ()");
}

TORCH_LIBRARY_IMPL(hutchtrace_emu, CUDA, m) { m.impl("_cudasim_selftest", &selftest); }
