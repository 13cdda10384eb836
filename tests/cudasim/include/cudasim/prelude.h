// Force-included (g++ -include) into every translation unit of the emulated extension.
//
// 1. The host headers the .cu sources use are included first, as ordinary host code, so
//    that nothing in PyTorch sees the CUDA macros defined below (their include guards
//    make the sources' own #includes no-ops later).
// 2. From then on the translation unit is "device code": __CUDACC__ and __CUDA_ARCH__ are
//    defined, so hutchtrace's shared headers compile their device branches (__dadd_rn,
//    __umulhi, __double_as_longlong, ...), which cudasim.h implements.
// 3. The CUDA keywords and built-ins map onto the emulator; TORCH_LIBRARY_IMPL registers
//    every kernel for the CPU dispatch key (tensors live in host memory), and
//    `tensor.is_cuda()` means "is in host memory". The build renames the C++ and operator
//    namespace (-Dhutchtrace=hutchtrace_emu), so the emulated ops never collide with the
//    real extension.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cudasim/cudasim.h>

#define __CUDACC__ 1
#define __CUDA_ARCH__ 900

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// build.py rewrites every `__shared__ T name[dims];` into a static that registers itself
// with the emulator (which poisons it before each block; blocks run one at a time, so one
// copy per variable is enough). A declaration it could not rewrite stops the build here.
#define __shared__ cudasim_error_this_shared_declaration_was_not_rewritten_by_build_py

#define threadIdx (::cudasim::detail::thread_idx)
#define blockIdx (::cudasim::detail::block_idx)
#define blockDim (::cudasim::detail::block_dim)
#define gridDim (::cudasim::detail::grid_dim)
#define warpSize (::cudasim::device::warpSize)

#define CUDASIM_SITE(op) (::cudasim::Site{op, __FILE__, __LINE__})
#define __syncthreads() ::cudasim::device::syncthreads(CUDASIM_SITE("__syncthreads"))
#define __syncthreads_count(p) ::cudasim::device::syncthreads_count(CUDASIM_SITE("__syncthreads_count"), (p))
#define __syncthreads_and(p) ::cudasim::device::syncthreads_and(CUDASIM_SITE("__syncthreads_and"), (p))
#define __syncthreads_or(p) ::cudasim::device::syncthreads_or(CUDASIM_SITE("__syncthreads_or"), (p))
#define __syncwarp(...) ::cudasim::device::syncwarp(CUDASIM_SITE("__syncwarp"), ##__VA_ARGS__)
#define __shfl_sync(...) ::cudasim::device::shfl_sync(CUDASIM_SITE("__shfl_sync"), __VA_ARGS__)
#define __shfl_up_sync(...) ::cudasim::device::shfl_up_sync(CUDASIM_SITE("__shfl_up_sync"), __VA_ARGS__)
#define __shfl_down_sync(...) ::cudasim::device::shfl_down_sync(CUDASIM_SITE("__shfl_down_sync"), __VA_ARGS__)
#define __shfl_xor_sync(...) ::cudasim::device::shfl_xor_sync(CUDASIM_SITE("__shfl_xor_sync"), __VA_ARGS__)
#define __all_sync(...) ::cudasim::device::all_sync(CUDASIM_SITE("__all_sync"), __VA_ARGS__)
#define __any_sync(...) ::cudasim::device::any_sync(CUDASIM_SITE("__any_sync"), __VA_ARGS__)
#define __ballot_sync(...) ::cudasim::device::ballot_sync(CUDASIM_SITE("__ballot_sync"), __VA_ARGS__)
#define __activemask() ::cudasim::device::activemask()

#define is_cuda is_cpu

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
