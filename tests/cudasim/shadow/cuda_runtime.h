// cudasim shadow of the CUDA runtime header: the emulator provides the runtime API.
#pragma once
#include <cudasim/cudasim.h>
