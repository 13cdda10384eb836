// Philox-4x32-10 and the counter mapping of hutchtrace probes (host + device).
//
// A probe entry is a pure function of (seed, probe index k, global element index i):
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (g mod 2^32, g >> 32, k mod 2^32, k >> 32),  g = i >> 2
// and element i uses output word (i & 3). This is the contract of
// hutchtrace/_reference.py (probe_words); the tests compare the two with torch.equal.
#pragma once

#include "hutchtrace/macros.h"

#if defined(__CUDACC__)
#define HT_UNROLL _Pragma("unroll")
#else
#define HT_UNROLL
#endif

namespace hutchtrace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Words4 {
  uint32_t x[4];
};

HT_HOST_DEVICE_INLINE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if HT_DEVICE_PASS
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

HT_HOST_DEVICE_INLINE Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                           uint32_t k0, uint32_t k1) {
  HT_UNROLL
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Words4 out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// The four words of group g (global elements 4g .. 4g+3) of probe k.
HT_HOST_DEVICE_INLINE Words4 probe_group_words(uint64_t seed, uint64_t probe, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(probe), static_cast<uint32_t>(probe >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Probe kinds, as passed through the op schemas (`int kind`).
enum ProbeKind : int { kRademacher = 0, kGaussian = 1 };

}  // namespace hutchtrace
