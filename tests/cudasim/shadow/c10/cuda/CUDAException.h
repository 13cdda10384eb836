// cudasim shadow of c10/cuda/CUDAException.h: the same checking macros, on the emulator's
// runtime API. Emulator errors found while a kernel runs (deadlocks, divergent barriers,
// bad masks) are raised by the launch itself; launch-configuration errors are sticky, as
// on hardware, and raised here.
#pragma once
#include <c10/util/Exception.h>
#include <cudasim/cudasim.h>

#define C10_CUDA_CHECK(EXPR)                                                                   \
  do {                                                                                         \
    const cudaError_t cudasim_err_ = (EXPR);                                                   \
    TORCH_CHECK(cudasim_err_ == cudaSuccess, "CUDA error (cudasim): ",                         \
                cudaGetErrorString(cudasim_err_), ": ", ::cudasim::detail::last_error_detail); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
