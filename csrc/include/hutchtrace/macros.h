// Host/device portability macros for headers compiled by both g++ and nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HT_HOST_DEVICE __host__ __device__
#define HT_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HT_HOST_DEVICE
#define HT_HOST_DEVICE_INLINE inline
#endif

// True while compiling device code (the second nvcc pass), where the _rn intrinsics exist.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define HT_DEVICE_PASS 1
#else
#define HT_DEVICE_PASS 0
#endif

#include <cmath>
#include <cstdint>

namespace hutchtrace {

// Correctly rounded double arithmetic that no compiler may fuse into an FMA.
// The host side relies on -ffp-contract=off (set in setup.py); the device side uses the
// explicit round-to-nearest intrinsics, which nvcc never contracts whatever --fmad says.
HT_HOST_DEVICE_INLINE double ht_add(double a, double b) {
#if HT_DEVICE_PASS
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

HT_HOST_DEVICE_INLINE double ht_sub(double a, double b) {
#if HT_DEVICE_PASS
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

HT_HOST_DEVICE_INLINE double ht_mul(double a, double b) {
#if HT_DEVICE_PASS
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

HT_HOST_DEVICE_INLINE double ht_div(double a, double b) {
#if HT_DEVICE_PASS
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

HT_HOST_DEVICE_INLINE double ht_sqrt(double a) {
#if HT_DEVICE_PASS
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);  // IEEE-754 sqrt is correctly rounded
#endif
}

}  // namespace hutchtrace
