// cudasim shadow of c10/cuda/CUDAFunctions.h: one emulated device.
#pragma once
#include <c10/core/Device.h>
#include <cudasim/cudasim.h>

namespace c10::cuda {
inline DeviceIndex device_count() noexcept { return 1; }
inline DeviceIndex current_device() { return 0; }
inline void set_device(DeviceIndex) {}
inline void device_synchronize() {}
}  // namespace c10::cuda
