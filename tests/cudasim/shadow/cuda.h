// cudasim shadow of the CUDA driver header (only the runtime API is emulated).
#pragma once
#include <cudasim/cudasim.h>
