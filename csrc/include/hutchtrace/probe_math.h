// Probe transforms shared by the CPU and CUDA kernels (host + device).
//
// The Gaussian transform reproduces hutchtrace/_reference.py bit for bit: the same
// polynomial schemes for log, sin and cos, the same coefficients (as exact hex literals)
// and the same order of operations, each a correctly rounded IEEE-754 operation that is
// never fused (see ht_add/ht_mul in macros.h). Do not "simplify" an expression here
// without changing the reference the same way.
#pragma once

#include "hutchtrace/macros.h"
#include "hutchtrace/philox.h"

namespace hutchtrace {

// 1/(2j+1), j = 0..11 (_reference.LOG_COEFFS)
#define HT_LOG_COEFFS                                                                    \
  {0x1.0000000000000p+0, 0x1.5555555555555p-2, 0x1.999999999999ap-3,                  \
   0x1.2492492492492p-3, 0x1.c71c71c71c71cp-4, 0x1.745d1745d1746p-4,                   \
   0x1.3b13b13b13b14p-4, 0x1.1111111111111p-4, 0x1.e1e1e1e1e1e1ep-5,                   \
   0x1.af286bca1af28p-5, 0x1.8618618618618p-5, 0x1.642c8590b2164p-5}
// (-1)^n/(2n+1)!, n = 0..8 (_reference.SIN_COEFFS)
#define HT_SIN_COEFFS                                                                    \
  {0x1.0000000000000p+0, -0x1.5555555555555p-3, 0x1.1111111111111p-7,                  \
   -0x1.a01a01a01a01ap-13, 0x1.71de3a556c734p-19, -0x1.ae64567f544e4p-26,              \
   0x1.6124613a86d09p-33, -0x1.ae7f3e733b81fp-41, 0x1.952c77030ad4ap-49}
// (-1)^n/(2n)!, n = 0..8 (_reference.COS_COEFFS)
#define HT_COS_COEFFS                                                                    \
  {0x1.0000000000000p+0, -0x1.0000000000000p-1, 0x1.5555555555555p-5,                  \
   -0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-16, -0x1.27e4fb7789f5cp-22,              \
   0x1.1eed8eff8d898p-29, -0x1.93974a8c07c9dp-37, 0x1.ae7f3e733b81fp-45}

constexpr double kLn2 = 0x1.62e42fefa39efp-1;      // 0.6931471805599453
constexpr double kHalfPi = 0x1.921fb54442d18p+0;   // 1.5707963267948966
constexpr double kSqrtHalf = 0x1.6a09e667f3bcdp-1; // 0.7071067811865476
constexpr double kTwoPowM32 = 0x1.0p-32;

HT_HOST_DEVICE_INLINE uint64_t ht_double_bits(double x) {
#if HT_DEVICE_PASS
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

HT_HOST_DEVICE_INLINE double ht_bits_double(uint64_t u) {
#if HT_DEVICE_PASS
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  __builtin_memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// frexp for positive *normal* doubles (a in [2^-32, 1] here): x = m 2^e, m in [0.5, 1).
HT_HOST_DEVICE_INLINE double ht_frexp_normal(double x, int* e) {
  const uint64_t u = ht_double_bits(x);
  *e = static_cast<int>((u >> 52) & 0x7FF) - 1022;
  return ht_bits_double((u & ~(0x7FFull << 52)) | (1022ull << 52));
}

// log(a) for a in (0, 1]: frexp, fold the mantissa to [sqrt(1/2), sqrt(2)), then
// 2 atanh(s) with s = (m-1)/(m+1) as an odd series (Horner in s^2).
HT_HOST_DEVICE_INLINE double log_poly(double a) {
  const double coeffs[12] = HT_LOG_COEFFS;
  int ei;
  double m = ht_frexp_normal(a, &ei);
  double e = static_cast<double>(ei);
  if (m < kSqrtHalf) {
    m = ht_mul(m, 2.0);
    e = ht_sub(e, 1.0);
  }
  const double s = ht_div(ht_sub(m, 1.0), ht_add(m, 1.0));
  const double s2 = ht_mul(s, s);
  double acc = coeffs[11];
  HT_UNROLL
  for (int j = 10; j >= 0; --j) {
    acc = ht_add(ht_mul(acc, s2), coeffs[j]);
  }
  const double poly = ht_mul(ht_mul(s, 2.0), acc);
  return ht_add(ht_mul(e, kLn2), poly);
}

// (cos(2 pi b), sin(2 pi b)) for b in [0, 1): exact quadrant split, fold to [0, pi/4],
// Taylor series for both.
HT_HOST_DEVICE_INLINE void sincos_turn(double b, double* cos_t, double* sin_t) {
  const double sc[9] = HT_SIN_COEFFS;
  const double cc[9] = HT_COS_COEFFS;
  const double v = ht_mul(b, 4.0);
  const int q = static_cast<int>(v);  // v >= 0, so truncation == floor
  const double f = ht_sub(v, static_cast<double>(q));
  const bool upper = f >= 0.5;
  const double g = upper ? ht_sub(1.0, f) : f;
  const double phi = ht_mul(g, kHalfPi);
  const double p2 = ht_mul(phi, phi);
  double s = sc[8];
  HT_UNROLL
  for (int n = 7; n >= 0; --n) {
    s = ht_add(ht_mul(s, p2), sc[n]);
  }
  s = ht_mul(s, phi);
  double c = cc[8];
  HT_UNROLL
  for (int n = 7; n >= 0; --n) {
    c = ht_add(ht_mul(c, p2), cc[n]);
  }
  const double sin_f = upper ? c : s;
  const double cos_f = upper ? s : c;
  switch (q) {
    case 0:
      *cos_t = cos_f;
      *sin_t = sin_f;
      break;
    case 1:
      *cos_t = -sin_f;
      *sin_t = cos_f;
      break;
    case 2:
      *cos_t = -cos_f;
      *sin_t = -sin_f;
      break;
    default:
      *cos_t = sin_f;
      *sin_t = -cos_f;
      break;
  }
}

// Box-Muller on lane pairs (0,1) and (2,3), in float64.
HT_HOST_DEVICE_INLINE void gaussian4(const Words4& w, double out[4]) {
  HT_UNROLL
  for (int j = 0; j < 2; ++j) {
    const double a = ht_mul(ht_add(static_cast<double>(w.x[2 * j]), 1.0), kTwoPowM32);  // exact
    const double b = ht_mul(static_cast<double>(w.x[2 * j + 1]), kTwoPowM32);     // exact
    const double r = ht_sqrt(ht_mul(log_poly(a), -2.0));
    double c, s;
    sincos_turn(b, &c, &s);
    out[2 * j] = ht_mul(r, c);
    out[2 * j + 1] = ht_mul(r, s);
  }
}

// +1 when the top bit is clear, -1 otherwise.
HT_HOST_DEVICE_INLINE double rademacher_value(uint32_t word) { return (word >> 31) ? -1.0 : 1.0; }

HT_HOST_DEVICE_INLINE void rademacher4(const Words4& w, double out[4]) {
  HT_UNROLL
  for (int l = 0; l < 4; ++l) out[l] = rademacher_value(w.x[l]);
}

// The four probe values (float64) of group `group` of probe `probe`.
template <int kKind>
HT_HOST_DEVICE_INLINE void probe_values4(uint64_t seed, uint64_t probe, uint64_t group, double out[4]) {
  const Words4 w = probe_group_words(seed, probe, group);
  if (kKind == kGaussian) {
    gaussian4(w, out);
  } else {
    rademacher4(w, out);
  }
}

// float64 probe value -> storage dtype, exactly as the reference: via float32 for every
// dtype but float64 (round-to-nearest-even at both steps).
template <typename T>
HT_HOST_DEVICE_INLINE T probe_cast(double v) {
  return static_cast<T>(static_cast<float>(v));
}
template <>
HT_HOST_DEVICE_INLINE double probe_cast<double>(double v) {
  return v;
}
template <>
HT_HOST_DEVICE_INLINE float probe_cast<float>(double v) {
  return static_cast<float>(v);
}

}  // namespace hutchtrace
