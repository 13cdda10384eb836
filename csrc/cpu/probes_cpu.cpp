// Counter-based probes on the CPU: one Philox-4x32-10 output per group of 4 global elements,
// computed kLanes groups at a time where a tile fits inside the row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hutchtrace/checks.h"
#include "hutchtrace/probe_math.h"

namespace hutchtrace {
namespace {

// Groups per parallel task; a Gaussian group costs ~0.1 us.
constexpr int64_t kGrain = 1024;

// Groups per Philox tile. The ten rounds run structure-of-arrays over the tile, so the
// compiler vectorises the 32x32->64 multiplies (pmuludq) without -march flags; one scalar
// Philox call per group leaves the CPU probe fill several times slower (docs/performance.md).
constexpr int kLanes = 32;

// Philox-4x32-10 of groups g0 .. g0+kLanes-1 of one probe, word-for-word the scalar
// philox4x32_10 of philox.h (same counter mapping, same key schedule).
inline void philox_tile(uint64_t seed, uint64_t probe, uint64_t g0, uint32_t (&w)[4][kLanes]) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  const uint32_t p_lo = static_cast<uint32_t>(probe), p_hi = static_cast<uint32_t>(probe >> 32);
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(g);
    c1[i] = static_cast<uint32_t>(g >> 32);
    c2[i] = p_lo;
    c3[i] = p_hi;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < kLanes; ++i) {
      const uint64_t a = static_cast<uint64_t>(kPhiloxM0) * c0[i];
      const uint64_t b = static_cast<uint64_t>(kPhiloxM1) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(b >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(a >> 32) ^ c3[i] ^ k1;
      c0[i] = n0;
      c1[i] = static_cast<uint32_t>(b);
      c2[i] = n2;
      c3[i] = static_cast<uint32_t>(a);
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int i = 0; i < kLanes; ++i) {
    w[0][i] = c0[i];
    w[1][i] = c1[i];
    w[2][i] = c2[i];
    w[3][i] = c3[i];
  }
}

// Fills the 4 kLanes entries of a tile whose groups lie wholly inside the row.
template <typename scalar_t, int kKind>
inline void write_tile(scalar_t* dst, const uint32_t (&w)[4][kLanes]) {
  if (kKind == kRademacher) {
    const scalar_t plus = probe_cast<scalar_t>(1.0), minus = probe_cast<scalar_t>(-1.0);
    for (int i = 0; i < kLanes; ++i) {
      for (int l = 0; l < 4; ++l) dst[4 * i + l] = (w[l][i] >> 31) ? minus : plus;
    }
  } else {
    for (int i = 0; i < kLanes; ++i) {
      Words4 words;
      for (int l = 0; l < 4; ++l) words.x[l] = w[l][i];
      double v[4];
      gaussian4(words, v);
      for (int l = 0; l < 4; ++l) dst[4 * i + l] = probe_cast<scalar_t>(v[l]);
    }
  }
}

template <typename scalar_t, int kKind>
void fill_probes_cpu(scalar_t* out, int64_t rows, int64_t n, uint64_t seed, uint64_t probe, uint64_t offset) {
  if (rows == 0 || n == 0) return;
  const uint64_t g_first = offset >> 2;
  const int64_t groups = static_cast<int64_t>(((offset + n - 1) >> 2) - g_first) + 1;
  at::parallel_for(0, rows * groups, kGrain, [&](int64_t begin, int64_t end) {
    int64_t idx = begin;
    while (idx < end) {
      const int64_t r = idx / groups;
      const int64_t row_end = std::min(end, (r + 1) * groups);
      scalar_t* row = out + r * n;
      while (idx < row_end) {
        const uint64_t g = g_first + static_cast<uint64_t>(idx - r * groups);
        const int64_t base = static_cast<int64_t>(4 * g) - static_cast<int64_t>(offset);
        // whole tiles strictly inside the row: the vectorised path
        if (idx + kLanes <= row_end && base >= 0 && base + 4 * kLanes <= n) {
          uint32_t w[4][kLanes];
          philox_tile(seed, probe + static_cast<uint64_t>(r), g, w);
          write_tile<scalar_t, kKind>(row + base, w);
          idx += kLanes;
          continue;
        }
        double v[4];
        probe_values4<kKind>(seed, probe + static_cast<uint64_t>(r), g, v);
        // base: local index of lane 0; the first group of an unaligned row starts before it.
        for (int l = 0; l < 4; ++l) {
          const int64_t j = base + l;
          if (j >= 0 && j < n) row[j] = probe_cast<scalar_t>(v[l]);
        }
        ++idx;
      }
    }
  });
}

template <int kKind>
void probes_cpu(at::Tensor& out, int64_t seed, int64_t probe, int64_t offset, const char* name) {
  const ProbeShape s = check_probe_args(out, seed, probe, offset, name);
  TORCH_CHECK_VALUE(out.device().is_cpu(), name, ": expected a CPU tensor");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hutchtrace_probes", [&] {
    fill_probes_cpu<scalar_t, kKind>(out.data_ptr<scalar_t>(), s.rows, s.n, static_cast<uint64_t>(seed),
                                     static_cast<uint64_t>(probe), static_cast<uint64_t>(offset));
  });
}

void rademacher_cpu(at::Tensor out, int64_t seed, int64_t probe, int64_t offset) {
  probes_cpu<kRademacher>(out, seed, probe, offset, "rademacher_");
}

void gaussian_cpu(at::Tensor out, int64_t seed, int64_t probe, int64_t offset) {
  probes_cpu<kGaussian>(out, seed, probe, offset, "gaussian_");
}

}  // namespace

TORCH_LIBRARY_IMPL(hutchtrace, CPU, m) {
  m.impl("rademacher_", &rademacher_cpu);
  m.impl("gaussian_", &gaussian_cpu);
}

}  // namespace hutchtrace
