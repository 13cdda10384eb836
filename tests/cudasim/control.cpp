// Operators that configure the emulator from Python (tests/cudasim/__init__.py):
//   hutchtrace_emu::_cudasim_configure(thread_order, block_order, seed, sm_count, max_grid_y)
//   hutchtrace_emu::_cudasim_limit_grid_y(max_grid_y)   (keeps the launch log)
//   hutchtrace_emu::_cudasim_log() -> one line per launch since the last configure
#include <torch/library.h>

#include <string>

namespace {

cudasim::Order parse_order(const std::string& s) {
  if (s == "forward") return cudasim::Order::kForward;
  if (s == "reverse") return cudasim::Order::kReverse;
  TORCH_CHECK_VALUE(s == "random", "cudasim: order must be 'forward', 'reverse' or 'random', got '", s, "'");
  return cudasim::Order::kRandom;
}

void configure(std::string thread_order, std::string block_order, int64_t seed, int64_t sm_count,
               int64_t max_grid_y) {
  TORCH_CHECK_VALUE(seed >= 0, "cudasim: seed must be non-negative");
  TORCH_CHECK_VALUE(sm_count >= 1 && sm_count <= 100000, "cudasim: sm_count must be in [1, 100000]");
  TORCH_CHECK_VALUE(max_grid_y >= 1 && max_grid_y <= 65535, "cudasim: max_grid_y must be in [1, 65535]");
  cudasim::configure(parse_order(thread_order), parse_order(block_order), static_cast<uint64_t>(seed),
                     static_cast<int>(sm_count), static_cast<unsigned>(max_grid_y));
}

void limit_grid_y(int64_t max_grid_y) {
  TORCH_CHECK_VALUE(max_grid_y >= 1 && max_grid_y <= 65535, "cudasim: max_grid_y must be in [1, 65535]");
  cudasim::config().max_grid_y = static_cast<unsigned>(max_grid_y);
}

std::string launch_log() { return cudasim::launch_log(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(hutchtrace_emu, m) {
  m.def("_cudasim_configure(str thread_order, str block_order, int seed, int sm_count, int max_grid_y) -> ()",
        &configure);
  m.def("_cudasim_limit_grid_y(int max_grid_y) -> ()", &limit_grid_y);
  m.def("_cudasim_log() -> str", &launch_log);
}
