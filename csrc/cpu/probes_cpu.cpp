// Counter-based probes on the CPU: one Philox call per group of 4 global elements.
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
      for (; idx < row_end; ++idx) {
        const uint64_t g = g_first + static_cast<uint64_t>(idx - r * groups);
        double v[4];
        probe_values4<kKind>(seed, probe + static_cast<uint64_t>(r), g, v);
        // Local index of lane 0; the first group of an unaligned row starts before it.
        const int64_t base = static_cast<int64_t>(4 * g) - static_cast<int64_t>(offset);
        for (int l = 0; l < 4; ++l) {
          const int64_t j = base + l;
          if (j >= 0 && j < n) row[j] = probe_cast<scalar_t>(v[l]);
        }
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
