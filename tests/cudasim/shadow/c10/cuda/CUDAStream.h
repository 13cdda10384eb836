// cudasim shadow of c10/cuda/CUDAStream.h: one stream; every launch completes before it
// returns, so stream order is program order.
#pragma once
#include <c10/core/Device.h>
#include <cudasim/cudasim.h>

namespace c10::cuda {
class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
  DeviceIndex device_index() const { return 0; }
  void synchronize() const {}
};
inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return CUDAStream(); }
inline CUDAStream getDefaultCUDAStream(DeviceIndex = -1) { return CUDAStream(); }
}  // namespace c10::cuda
