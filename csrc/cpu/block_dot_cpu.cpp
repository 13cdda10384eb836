// Fused per-block dot products on the CPU: fixed-size chunks, one partial per
// (row, chunk) in parallel, then a fixed-order sum per block (deterministic).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "hutchtrace/checks.h"
#include "hutchtrace/probe_math.h"

namespace hutchtrace {
namespace {

constexpr int64_t kChunk = int64_t{1} << 15;  // elements per partial

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(static_cast<at::opmath_type<scalar_t>>(v));
}

// Eight independent accumulators: vectorisable without reassociating anything.
template <typename scalar_t, typename acc_t>
void dot_sq_explicit(const scalar_t* w, const scalar_t* z, int64_t begin, int64_t end, acc_t* dot, acc_t* sq) {
  acc_t d[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const acc_t a = to_acc<acc_t>(w[i + k]);
      const acc_t b = to_acc<acc_t>(z[i + k]);
      d[k] += a * b;
      s[k] += a * a;
    }
  }
  for (int k = 0; i < end; ++i, ++k) {
    const acc_t a = to_acc<acc_t>(w[i]);
    const acc_t b = to_acc<acc_t>(z[i]);
    d[k] += a * b;
    s[k] += a * a;
  }
  *dot = ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
  *sq = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// The probe of local elements [begin, end) is regenerated group by group; it is cast to
// w's dtype first, exactly like the probe the explicit path would have read.
template <typename scalar_t, typename acc_t, int kKind>
void dot_sq_regen(const scalar_t* w, int64_t begin, int64_t end, uint64_t offset, uint64_t seed, uint64_t probe,
                  acc_t* dot, acc_t* sq) {
  acc_t d[4] = {0, 0, 0, 0};
  acc_t s[4] = {0, 0, 0, 0};
  const uint64_t g_first = (offset + begin) >> 2;
  const uint64_t g_last = (offset + end - 1) >> 2;
  for (uint64_t g = g_first; g <= g_last; ++g) {
    double v[4];
    probe_values4<kKind>(seed, probe, g, v);
    const int64_t base = static_cast<int64_t>(4 * g) - static_cast<int64_t>(offset);
    for (int l = 0; l < 4; ++l) {
      const int64_t e = base + l;
      if (e < begin || e >= end) continue;
      const acc_t a = to_acc<acc_t>(w[e]);
      const acc_t b = to_acc<acc_t>(probe_cast<scalar_t>(v[l]));
      d[l] += a * b;
      s[l] += a * a;
    }
  }
  *dot = (d[0] + d[1]) + (d[2] + d[3]);
  *sq = (s[0] + s[1]) + (s[2] + s[3]);
}

struct RegenArgs {
  uint64_t seed;
  uint64_t probe;
  int kind;
};

template <typename scalar_t, typename acc_t>
void chunk_partial(const DotEntry& e, int64_t row, int64_t begin, int64_t end, const RegenArgs* regen, acc_t* dot,
                   acc_t* sq) {
  const scalar_t* w = static_cast<const scalar_t*>(e.w) + row * e.w_stride;
  if (regen == nullptr) {
    const scalar_t* z = static_cast<const scalar_t*>(e.z) + row * e.z_stride;
    dot_sq_explicit<scalar_t, acc_t>(w, z, begin, end, dot, sq);
  } else if (regen->kind == kGaussian) {
    dot_sq_regen<scalar_t, acc_t, kGaussian>(w, begin, end, static_cast<uint64_t>(e.offset), regen->seed,
                                              regen->probe + static_cast<uint64_t>(row), dot, sq);
  } else {
    dot_sq_regen<scalar_t, acc_t, kRademacher>(w, begin, end, static_cast<uint64_t>(e.offset), regen->seed,
                                                regen->probe + static_cast<uint64_t>(row), dot, sq);
  }
}

template <typename acc_t>
void run_plan(const BlockPlan& plan, const RegenArgs* regen, at::Tensor& dots, at::Tensor& sqs) {
  const int64_t C = plan.num_chunks;
  const int64_t rows = plan.rows;
  const int64_t L = plan.num_blocks;
  std::vector<acc_t> pd(static_cast<size_t>(rows * C));
  std::vector<acc_t> ps(static_cast<size_t>(rows * C));
  std::vector<int32_t> chunk_entry(static_cast<size_t>(C));
  for (size_t k = 0; k < plan.entries.size(); ++k) {
    const DotEntry& e = plan.entries[k];
    const int64_t nc = num_chunks_of(e.n, kChunk);
    for (int64_t c = 0; c < nc; ++c) chunk_entry[e.chunk_begin + c] = static_cast<int32_t>(k);
  }
  at::parallel_for(0, rows * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t r = idx / C;
      const int64_t c = idx - r * C;
      const DotEntry& e = plan.entries[chunk_entry[c]];
      const int64_t lo = (c - e.chunk_begin) * kChunk;
      const int64_t hi = std::min(lo + kChunk, e.n);
      acc_t dot = 0, sq = 0;
      switch (e.dtype) {
        case kFloat32:
          chunk_partial<float, acc_t>(e, r, lo, hi, regen, &dot, &sq);
          break;
        case kFloat64:
          chunk_partial<double, acc_t>(e, r, lo, hi, regen, &dot, &sq);
          break;
        case kFloat16:
          chunk_partial<c10::Half, acc_t>(e, r, lo, hi, regen, &dot, &sq);
          break;
        default:
          chunk_partial<c10::BFloat16, acc_t>(e, r, lo, hi, regen, &dot, &sq);
          break;
      }
      pd[idx] = dot;
      ps[idx] = sq;
    }
  });
  acc_t* out_d = dots.data_ptr<acc_t>();
  acc_t* out_s = sqs.data_ptr<acc_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < L; ++b) {
      acc_t d = 0, s = 0;
      for (int64_t c = plan.block_chunk_begin[b]; c < plan.block_chunk_begin[b + 1]; ++c) {
        d += pd[r * C + c];
        s += ps[r * C + c];
      }
      out_d[r * L + b] = d;
      out_s[r * L + b] = s;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> run(const BlockPlan& plan, const RegenArgs* regen, const at::Device& device) {
  const auto opts = at::TensorOptions().dtype(plan.acc).device(device);
  at::Tensor dots = at::empty(plan.out_shape, opts);
  at::Tensor sqs = at::empty(plan.out_shape, opts);
  if (plan.acc == at::kDouble) {
    run_plan<double>(plan, regen, dots, sqs);
  } else {
    run_plan<float>(plan, regen, dots, sqs);
  }
  return {dots, sqs};
}

std::tuple<at::Tensor, at::Tensor> block_dot_cpu(at::TensorList w, at::TensorList z, at::IntArrayRef block_index,
                                                 int64_t num_blocks, bool batched,
                                                 std::optional<at::ScalarType> acc_dtype) {
  const BlockPlan plan = make_block_plan(w, std::optional<at::TensorList>(z), {}, block_index, num_blocks, batched,
                                         acc_dtype, kChunk, "block_dot");
  TORCH_CHECK_VALUE(w[0].device().is_cpu(), "block_dot: expected CPU tensors");
  return run(plan, nullptr, w[0].device());
}

std::tuple<at::Tensor, at::Tensor> block_dot_regen_cpu(at::TensorList w, at::IntArrayRef offsets,
                                                       at::IntArrayRef block_index, int64_t num_blocks, int64_t seed,
                                                       int64_t probe, int64_t kind, bool batched,
                                                       std::optional<at::ScalarType> acc_dtype) {
  check_regen_args(seed, probe, kind);
  const BlockPlan plan = make_block_plan(w, std::nullopt, offsets, block_index, num_blocks, batched, acc_dtype,
                                         kChunk, "block_dot_regen");
  check_regen_rows(probe, plan.rows);
  TORCH_CHECK_VALUE(w[0].device().is_cpu(), "block_dot_regen: expected CPU tensors");
  const RegenArgs regen{static_cast<uint64_t>(seed), static_cast<uint64_t>(probe), static_cast<int>(kind)};
  return run(plan, &regen, w[0].device());
}

}  // namespace

TORCH_LIBRARY_IMPL(hutchtrace, CPU, m) {
  m.impl("block_dot", &block_dot_cpu);
  m.impl("block_dot_regen", &block_dot_regen_cpu);
}

}  // namespace hutchtrace
