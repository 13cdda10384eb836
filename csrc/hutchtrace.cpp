// hutchtrace._C: operator schemas (declared once, here) and the Python module stub.
//
// Kernels are registered per device in cpu/*.cpp (TORCH_LIBRARY_IMPL(hutchtrace, CPU, m))
// and cuda/*.cu (TORCH_LIBRARY_IMPL(hutchtrace, CUDA, m)); a CPU-only build simply has no
// CUDA kernels. Fake (meta) kernels live in hutchtrace/_fake.py.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `from hutchtrace import _C` loads this shared object, which runs the static
// TORCH_LIBRARY initialisers below. The module itself is empty: every op is reached
// through torch.ops.hutchtrace, so no pybind11 and no Python C API beyond this stub
// (which keeps the module compatible with the limited API).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace hutchtrace {

static bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(hutchtrace, m) {
  // Whether the CUDA kernels were compiled into this build (no tensor arguments:
  // a catch-all kernel).
  m.def("_cuda_compiled() -> bool", &cuda_compiled);

  // Probes, in place. out: (n,) or (B, n), contiguous, float16/bfloat16/float32/float64.
  // Row r is probe index probe + r; element j of a row is global element offset + j.
  m.def("rademacher_(Tensor(a!) out, int seed, int probe, int offset) -> ()");
  m.def("gaussian_(Tensor(a!) out, int seed, int probe, int offset) -> ()");

  // Per-block (sum <z_j, w_j>, sum ||w_j||^2) over tensors j with block block_index[j].
  // Outputs (num_blocks,) or, batched, (B, num_blocks) in acc_dtype (default float64).
  m.def(
      "block_dot(Tensor[] w, Tensor[] z, int[] block_index, int num_blocks, bool batched=False, "
      "ScalarType? acc_dtype=None) -> (Tensor, Tensor)");
  // Same, with z_j regenerated from (seed, probe + row, offsets[j] + element); kind 0 is
  // Rademacher, 1 Gaussian.
  m.def(
      "block_dot_regen(Tensor[] w, int[] offsets, int[] block_index, int num_blocks, int seed, int probe, "
      "int kind=0, bool batched=False, ScalarType? acc_dtype=None) -> (Tensor, Tensor)");

  // Streaming statistics. count: int64 one-element; mean, m2: float64 (L,);
  // x: (L,) or (B, L) float32/float64, rows applied in order.
  m.def("welford_update_(Tensor(a!) count, Tensor(b!) mean, Tensor(c!) m2, Tensor x) -> ()");
  // Chan merge of state b into state a.
  m.def(
      "welford_merge_(Tensor(a!) count, Tensor(b!) mean, Tensor(c!) m2, Tensor count_b, Tensor mean_b, "
      "Tensor m2_b) -> ()");
}

}  // namespace hutchtrace
