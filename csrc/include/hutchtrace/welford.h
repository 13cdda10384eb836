// Welford streaming statistics and Chan's merge (host + device).
//
// Same formulas, in the same order, as hutchtrace/_reference.py (welford_update_,
// welford_merge_). The count is an integer so it never drifts; it is converted to
// float64 where the formulas need it, like the reference's count.to(float64).
#pragma once

#include "hutchtrace/macros.h"

namespace hutchtrace {

struct WelfordState {
  int64_t n;
  double mean;
  double m2;
};

// n += 1; d = x - mean; mean += d / n; m2 += d * (x - mean)
HT_HOST_DEVICE_INLINE void welford_update(WelfordState& s, double x) {
  s.n += 1;
  const double d = ht_sub(x, s.mean);
  s.mean = ht_add(s.mean, ht_div(d, static_cast<double>(s.n)));
  s.m2 = ht_add(s.m2, ht_mul(d, ht_sub(x, s.mean)));
}

// Chan et al.: merge b into a. n = na + nb; d = mean_b - mean_a;
// mean += d (nb / n); m2 += m2_b + d^2 (na nb / n). An empty total keeps 0/0 out.
HT_HOST_DEVICE_INLINE void welford_combine(WelfordState& a, const WelfordState& b) {
  const double na = static_cast<double>(a.n);
  const double nb = static_cast<double>(b.n);
  const double n = ht_add(na, nb);
  const double safe_n = n > 0.0 ? n : 1.0;
  const double d = ht_sub(b.mean, a.mean);
  a.mean = ht_add(a.mean, ht_mul(d, ht_div(nb, safe_n)));
  a.m2 = ht_add(a.m2, ht_add(b.m2, ht_mul(ht_mul(d, d), ht_div(ht_mul(na, nb), safe_n))));
  a.n += b.n;
}

}  // namespace hutchtrace
