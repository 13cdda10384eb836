// Plain-data description of a block_dot work list (host + device).
//
// Each non-empty input tensor j becomes one DotEntry. Its probe rows (one row unless the
// op is batched) are cut into chunks of a fixed number of elements; chunk indices are
// global and per row, and entries are sorted by block so that the chunks of a block form
// one contiguous range. Pass 1 writes one (dot, sq) partial per (row, chunk); pass 2
// sums each block's range in chunk order. No atomics, so results are deterministic.
#pragma once

#include "hutchtrace/macros.h"

namespace hutchtrace {

enum DTypeCode : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct DotEntry {
  const void* w;        // row 0 of w_j
  const void* z;        // row 0 of z_j; nullptr when the probe is regenerated
  int64_t n;            // elements per probe row (> 0)
  int64_t w_stride;     // elements between consecutive probe rows of w_j
  int64_t z_stride;     // elements between consecutive probe rows of z_j
  int64_t offset;       // global element index of w_j[..., 0] (regenerated probes)
  int64_t chunk_begin;  // global index of this entry's first chunk
  int32_t block;        // block id in [0, num_blocks)
  int32_t dtype;        // DTypeCode of w_j (and z_j)
};

// Chunks of an entry: ceil(n / chunk).
HT_HOST_DEVICE_INLINE int64_t num_chunks_of(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

}  // namespace hutchtrace
