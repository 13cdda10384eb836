// Host-side argument checks and work planning shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "hutchtrace/block_dot_types.h"
#include "hutchtrace/philox.h"

namespace hutchtrace {

inline bool dtype_supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kFloat32;
    case at::kDouble:
      return kFloat64;
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "hutchtrace: unsupported dtype ", t,
                       " (expected float16, bfloat16, float32 or float64)");
  }
  return -1;
}

// Arguments of rademacher_ / gaussian_.
struct ProbeShape {
  int64_t rows;
  int64_t n;
};

// The Philox key and counter of a probe: (seed, probe index), both non-negative.
inline void check_seed_probe(int64_t seed, int64_t probe, const char* name) {
  TORCH_CHECK_VALUE(seed >= 0, name, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(probe >= 0, name, ": probe index must be non-negative, got ", probe);
}

// Scalar arguments of block_dot_regen (the tensors are checked by make_block_plan).
inline void check_regen_args(int64_t seed, int64_t probe, int64_t kind) {
  check_seed_probe(seed, probe, "block_dot_regen");
  TORCH_CHECK_VALUE(kind == kRademacher || kind == kGaussian, "block_dot_regen: kind must be 0 (rademacher) or 1 "
              "(gaussian), got ", kind);
}

// Probe rows of block_dot_regen: row r is probe index probe + r, kept in int64 with the
// same bound as the probe ops (probe + B <= 2**63 - 1).
inline void check_regen_rows(int64_t probe, int64_t rows) {
  TORCH_CHECK_VALUE(rows == 0 || probe <= std::numeric_limits<int64_t>::max() - rows, "block_dot_regen: probe + B = ",
                    probe, " + ", rows, " overflows int64; use probe indices below 2**63 - 1 - B");
}

inline ProbeShape check_probe_args(const at::Tensor& out, int64_t seed, int64_t probe, int64_t offset,
                                   const char* name) {
  TORCH_CHECK_VALUE(out.dim() == 1 || out.dim() == 2, name, ": out must be 1-D (n) or 2-D (B, n), got shape ",
              out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), name, ": out must be contiguous");
  dtype_code(out.scalar_type());
  check_seed_probe(seed, probe, name);
  TORCH_CHECK_VALUE(offset >= 0, name, ": offset must be non-negative, got ", offset);
  ProbeShape s;
  s.rows = out.dim() == 2 ? out.size(0) : 1;
  s.n = out.size(-1);
  TORCH_CHECK_VALUE(s.n == 0 || offset <= std::numeric_limits<int64_t>::max() - s.n, name, ": offset + n overflows");
  TORCH_CHECK_VALUE(s.rows == 0 || probe <= std::numeric_limits<int64_t>::max() - s.rows, name,
              ": probe + B overflows");
  return s;
}

// A block_dot work list: entries sorted by block, empty tensors dropped.
struct BlockPlan {
  std::vector<at::Tensor> keep;  // contiguous copies of strided inputs, kept alive
  std::vector<DotEntry> entries;
  std::vector<int64_t> block_chunk_begin;  // (L + 1) chunk ranges per block
  int64_t rows = 1;                        // probe rows (B when batched)
  int64_t num_chunks = 0;                  // chunks per row
  int64_t num_blocks = 0;
  at::ScalarType acc = at::kDouble;
  std::vector<int64_t> out_shape;
};

// Whether dims 1.. of t are contiguous (each probe row is one dense run).
inline bool rows_dense(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1) {
      if (t.stride(d) != expected) return false;
      expected *= t.size(d);
    }
  }
  return true;
}

// Pointer to row 0, elements per row and row stride of t viewed as (rows, n).
inline const void* row_layout(const at::Tensor& t, bool batched, int64_t rows, int64_t* n, int64_t* stride,
                              std::vector<at::Tensor>& keep) {
  at::Tensor u = t;
  if (batched ? !rows_dense(t) : !t.is_contiguous()) {
    u = t.contiguous();
    keep.push_back(u);
  }
  if (!batched) {
    *n = u.numel();
    *stride = *n;
  } else {
    int64_t inner = 1;
    for (int64_t d = 1; d < u.dim(); ++d) inner *= u.size(d);
    *n = inner;
    *stride = rows > 1 ? u.stride(0) : inner;
  }
  return u.data_ptr();
}

inline BlockPlan make_block_plan(at::TensorList w, const std::optional<at::TensorList>& z,
                                 at::IntArrayRef offsets, at::IntArrayRef block_index, int64_t num_blocks,
                                 bool batched, std::optional<at::ScalarType> acc_dtype, int64_t chunk,
                                 const char* name) {
  const bool regen = !z.has_value();
  const size_t T = w.size();
  TORCH_CHECK_VALUE(T >= 1, name, ": w must hold at least one tensor");
  TORCH_CHECK_VALUE(block_index.size() == T, name, ": block_index has ", block_index.size(), " entries for ", T,
              " tensors");
  if (regen) {
    TORCH_CHECK_VALUE(offsets.size() == T, name, ": offsets has ", offsets.size(), " entries for ", T, " tensors");
  } else {
    TORCH_CHECK_VALUE(z->size() == T, name, ": w and z must have the same length, got ", T, " and ", z->size());
  }
  TORCH_CHECK_VALUE(num_blocks >= 0 && num_blocks <= std::numeric_limits<int32_t>::max(), name,
              ": num_blocks out of range: ", num_blocks);
  BlockPlan plan;
  plan.num_blocks = num_blocks;
  plan.acc = acc_dtype.value_or(at::kDouble);
  TORCH_CHECK_VALUE(plan.acc == at::kDouble || plan.acc == at::kFloat, name,
              ": acc_dtype must be float32 or float64, got ", plan.acc);
  const at::Device device = w[0].device();
  if (batched) {
    TORCH_CHECK_VALUE(w[0].dim() >= 1, name, ": batched inputs need a leading probe dimension");
    plan.rows = w[0].size(0);
    plan.out_shape = {plan.rows, num_blocks};
  } else {
    plan.rows = 1;
    plan.out_shape = {num_blocks};
  }
  plan.entries.reserve(T);
  for (size_t j = 0; j < T; ++j) {
    const at::Tensor& wj = w[j];
    TORCH_CHECK_VALUE(wj.device() == device, name, ": all tensors must be on ", device, ", w[", j, "] is on ",
                wj.device());
    const int64_t b = block_index[j];
    TORCH_CHECK_VALUE(b >= 0 && b < num_blocks, name, ": block_index[", j, "] = ", b, " is outside [0, ", num_blocks,
                ")");
    if (batched) {
      TORCH_CHECK_VALUE(wj.dim() >= 1 && wj.size(0) == plan.rows, name, ": w[", j, "] has shape ", wj.sizes(),
                  ", expected a leading probe dimension of ", plan.rows);
    }
    DotEntry e{};
    e.block = static_cast<int32_t>(b);
    if (regen) {
      TORCH_CHECK_TYPE(dtype_supported(wj.scalar_type()), name, ": w[", j, "] has unsupported dtype ",
                       wj.scalar_type(), " (expected float16, bfloat16, float32 or float64)");
      TORCH_CHECK_VALUE(offsets[j] >= 0, name, ": offsets[", j, "] must be non-negative, got ", offsets[j]);
      e.dtype = dtype_code(wj.scalar_type());
      e.w = row_layout(wj, batched, plan.rows, &e.n, &e.w_stride, plan.keep);
      // Element i of tensor j is global element offsets[j] + i, an int64 like every probe offset.
      TORCH_CHECK_VALUE(e.n == 0 || offsets[j] <= std::numeric_limits<int64_t>::max() - e.n, name,
                        ": offsets[", j, "] + n = ", offsets[j], " + ", e.n,
                        " overflows int64; global element offsets must stay below 2**63 - 1 - n");
      e.offset = offsets[j];
      e.z = nullptr;
      e.z_stride = 0;
    } else {
      const at::Tensor& zj = (*z)[j];
      TORCH_CHECK_VALUE(zj.device() == device, name, ": all tensors must be on ", device, ", z[", j,
                        "] is on ", zj.device());
      TORCH_CHECK_VALUE(zj.sizes() == wj.sizes(), name, ": shape mismatch at ", j, ": w ", wj.sizes(),
                        " vs z ", zj.sizes());
      at::Tensor wc = wj, zc = zj;
      if (wj.scalar_type() != zj.scalar_type() || !dtype_supported(wj.scalar_type())) {
        // Rare mixed or integer pairs: both sides to the accumulation dtype, which is
        // exactly what the reference does before multiplying.
        wc = wj.to(plan.acc);
        zc = zj.to(plan.acc);
        plan.keep.push_back(wc);
        plan.keep.push_back(zc);
      }
      e.dtype = dtype_code(wc.scalar_type());
      e.w = row_layout(wc, batched, plan.rows, &e.n, &e.w_stride, plan.keep);
      int64_t nz = 0;
      e.z = row_layout(zc, batched, plan.rows, &nz, &e.z_stride, plan.keep);
      e.offset = 0;
    }
    if (e.n > 0 && plan.rows > 0) plan.entries.push_back(e);
  }
  std::stable_sort(plan.entries.begin(), plan.entries.end(),
                   [](const DotEntry& a, const DotEntry& b) { return a.block < b.block; });
  plan.block_chunk_begin.assign(num_blocks + 1, 0);
  int64_t c = 0;
  size_t k = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    plan.block_chunk_begin[b] = c;
    for (; k < plan.entries.size() && plan.entries[k].block == b; ++k) {
      plan.entries[k].chunk_begin = c;
      c += num_chunks_of(plan.entries[k].n, chunk);
    }
  }
  plan.block_chunk_begin[num_blocks] = c;
  plan.num_chunks = c;
  return plan;
}

// Arguments of welford_update_ / welford_merge_: returns L.
inline int64_t check_welford_state(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                   const char* name) {
  TORCH_CHECK_VALUE(count.scalar_type() == at::kLong && count.numel() == 1, name,
              ": count must be a one-element int64 tensor, got ", count.scalar_type(), " ", count.sizes());
  TORCH_CHECK_VALUE(mean.scalar_type() == at::kDouble && m2.scalar_type() == at::kDouble, name,
              ": mean and m2 must be float64");
  TORCH_CHECK_VALUE(mean.dim() == 1 && m2.sizes() == mean.sizes(), name, ": mean and m2 must have shape (L,), got ",
              mean.sizes(), " and ", m2.sizes());
  TORCH_CHECK_VALUE(mean.is_contiguous() && m2.is_contiguous(), name, ": mean and m2 must be contiguous");
  TORCH_CHECK_VALUE(count.device() == mean.device() && m2.device() == mean.device(), name,
              ": count, mean and m2 must be on one device");
  return mean.size(0);
}

// Arguments of welford_merge_ except their device (checked per backend): returns L.
inline int64_t check_welford_merge_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                        const at::Tensor& count_b, const at::Tensor& mean_b,
                                        const at::Tensor& m2_b) {
  const int64_t L = check_welford_state(count, mean, m2, "welford_merge_");
  TORCH_CHECK_VALUE(count_b.scalar_type() == at::kLong && count_b.numel() == 1,
              "welford_merge_: count_b must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(mean_b.scalar_type() == at::kDouble && m2_b.scalar_type() == at::kDouble,
              "welford_merge_: mean_b and m2_b must be float64");
  TORCH_CHECK_VALUE(mean_b.numel() == L && m2_b.numel() == L, "welford_merge_: state b must have ", L,
              " entries per statistic");
  return L;
}

}  // namespace hutchtrace
