// Streaming per-block statistics on the CPU (formulas in hutchtrace/welford.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hutchtrace/checks.h"
#include "hutchtrace/welford.h"

namespace hutchtrace {
namespace {

constexpr int64_t kGrain = 4096;

void welford_update_cpu(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& x_in) {
  const int64_t L = check_welford_state(count, mean, m2, "welford_update_");
  TORCH_CHECK_VALUE(mean.device().is_cpu() && x_in.device().is_cpu(), "welford_update_: expected CPU tensors");
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "welford_update_: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE((x_in.dim() == 1 || x_in.dim() == 2) && x_in.size(-1) == L,
              "welford_update_: x must have shape (L,) or (B, L) with L = ", L, ", got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.dim() == 2 ? x.size(0) : 1;
  int64_t* n_ptr = count.data_ptr<int64_t>();
  const int64_t n0 = *n_ptr;
  double* mean_p = mean.data_ptr<double>();
  double* m2_p = m2.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "welford_update_", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, L, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l) {
        WelfordState s{n0, mean_p[l], m2_p[l]};
        for (int64_t r = 0; r < rows; ++r) welford_update(s, static_cast<double>(xp[r * L + l]));
        mean_p[l] = s.mean;
        m2_p[l] = s.m2;
      }
    });
  });
  *n_ptr = n0 + rows;
}

void welford_merge_cpu(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& count_b,
                       const at::Tensor& mean_b_in, const at::Tensor& m2_b_in) {
  const int64_t L = check_welford_merge_args(count, mean, m2, count_b, mean_b_in, m2_b_in);
  TORCH_CHECK_VALUE(mean.device().is_cpu() && count_b.device().is_cpu() && mean_b_in.device().is_cpu() &&
                  m2_b_in.device().is_cpu(),
              "welford_merge_: expected CPU tensors");
  const at::Tensor mean_b = mean_b_in.contiguous();
  const at::Tensor m2_b = m2_b_in.contiguous();
  int64_t* n_ptr = count.data_ptr<int64_t>();
  const int64_t na = *n_ptr;
  const int64_t nb = *count_b.data_ptr<int64_t>();
  double* mean_p = mean.data_ptr<double>();
  double* m2_p = m2.data_ptr<double>();
  const double* mean_bp = mean_b.data_ptr<double>();
  const double* m2_bp = m2_b.data_ptr<double>();
  at::parallel_for(0, L, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      WelfordState a{na, mean_p[l], m2_p[l]};
      welford_combine(a, WelfordState{nb, mean_bp[l], m2_bp[l]});
      mean_p[l] = a.mean;
      m2_p[l] = a.m2;
    }
  });
  *n_ptr = na + nb;
}

}  // namespace

TORCH_LIBRARY_IMPL(hutchtrace, CPU, m) {
  m.impl("welford_update_", &welford_update_cpu);
  m.impl("welford_merge_", &welford_merge_cpu);
}

}  // namespace hutchtrace
