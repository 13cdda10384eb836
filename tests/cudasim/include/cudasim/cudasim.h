// cudasim: a CUDA execution emulator for testing hutchtrace's kernels on the CPU.
//
// The real csrc/cuda/*.cu sources are compiled with g++ (tests/cudasim/build.py rewrites
// only the `kernel<<<grid, block, shmem, stream>>>(args)` launch syntax) and run here:
//
// * every CUDA thread of a block is a cooperative user-space thread (a fiber with its
//   own stack); a fiber runs until it reaches a barrier, a warp operation or its end;
// * the scheduler always resumes the runnable fiber of highest priority. Priorities are
//   a per-block permutation of the threads: forward, reverse or seeded random (warps in a
//   random order, lanes in a random order inside each warp). Blocks run one after
//   another, in forward, reverse or seeded random order;
// * warps have 32 lanes. A warp operation (__shfl_*_sync, votes, __syncwarp) completes when
//   every lane its mask names has arrived at the same operation, at the same call site,
//   with the same mask; __syncthreads completes when every thread of the block arrived at
//   the same call site;
// * whatever real hardware would leave hanging, or leave undefined, is an error that names
//   the kernel, the block and the thread: a barrier that some thread skips or exits
//   before, a mask naming a lane that has exited, waits elsewhere or does not exist, a
//   shuffle reading a lane outside the mask, a deadlock;
// * __shared__ variables (build.py rewrites each declaration into a registered static) are
//   poisoned with 0xFF bytes (a NaN in every float type) before every block, so a read
//   before the block wrote it shows;
// * grid sizing sees a configurable SM count, so grid-stride loops iterate, and launch
//   configurations are checked against the hardware limits (grid.y and grid.z <= 65535
//   by default, configurable to exercise launch splitting at small sizes);
// * intrinsics (__dadd_rn, __umulhi, __double_as_longlong, ...) are their IEEE-754 /
//   integer definitions; the build passes -ffp-contract=off, so nothing is fused.
//
// Not modelled: memory-model effects between threads other than the scheduling order,
// asynchronous streams (every launch completes before it returns), dynamic shared memory,
// cooperative groups, textures, out-of-bounds accesses (use compute-sanitizer on a GPU),
// and nvcc's FMA contraction of plain `a * b + c` (real hardware may round block_dot
// partial sums differently; the tests bound the rounding, they do not compare bits).
//
// Header-only. Runtime state lives in C++17 inline variables, so every translation unit
// of one shared library shares one emulator.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ------------------------------------------------------------------ CUDA vector types
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

namespace cudasim {

// ------------------------------------------------------------------------ configuration
enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
  Order thread_order = Order::kForward;
  Order block_order = Order::kForward;
  uint64_t seed = 0;
  int sm_count = 132;  // H100 SXM
  unsigned max_grid_x = 2147483647u;
  unsigned max_grid_y = 65535u;
  unsigned max_grid_z = 65535u;
  bool poison_shared = true;
};

inline Config& config() {
  static Config c;
  return c;
}

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // a 24 KiB kernel parameter table is copied per thread

// Where a thread waits: the call site of a barrier or warp operation.
struct Site {
  const char* op;
  const char* file;
  int line;
};

inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0) &&
         std::strcmp(a.op, b.op) == 0;
}

inline std::string site_str(const Site& s) {
  const char* base = std::strrchr(s.file, '/');
  std::ostringstream os;
  os << s.op << " (" << (base ? base + 1 : s.file) << ":" << s.line << ")";
  return os.str();
}

// Compact list of thread indices: "0-31, 64, 96-127".
inline std::string ranges(const std::vector<unsigned>& ids) {
  std::ostringstream os;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) os << ", ";
    os << ids[i];
    if (j > i) os << "-" << ids[j];
    i = j + 1;
  }
  return os.str();
}

inline std::string dim_str(unsigned x, unsigned y, unsigned z) {
  std::ostringstream os;
  os << "(" << x << ", " << y << ", " << z << ")";
  return os.str();
}

// One launch as recorded in the log (tests check grid sizes and launch splitting).
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
};

// --------------------------------------------------------------------- context switch
namespace detail {

#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp, and resumes the context whose stack pointer is
// load_sp. A new context starts in cudasim_fiber_start with r12 = argument, r13 = entry.
extern "C" void cudasim_switch(void** save_sp, void* load_sp);
extern "C" void cudasim_fiber_start();
asm(R"(
  .text
  .p2align 4
  .weak cudasim_switch
  .hidden cudasim_switch
  .type cudasim_switch, @function
cudasim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudasim_switch, .-cudasim_switch

  .p2align 4
  .weak cudasim_fiber_start
  .hidden cudasim_fiber_start
  .type cudasim_fiber_start, @function
cudasim_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size cudasim_fiber_start, .-cudasim_fiber_start
)");
#endif

// A fiber's stack: mmap'd once, with a PROT_NONE guard page below it so that an overflow
// faults instead of corrupting the next stack.
struct Stack {
  char* base = nullptr;  // guard page
  char* lo = nullptr;
  size_t size = 0;
};

inline Stack make_stack(size_t size) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cudasim: cannot allocate a fiber stack");
  mprotect(p, page, PROT_NONE);
  Stack s;
  s.base = static_cast<char*>(p);
  s.lo = s.base + page;
  s.size = size;
  return s;
}

}  // namespace detail

// ------------------------------------------------------------------------------ fibers
enum class State : int { kRunnable, kBarrier, kWarp, kDone };

enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kAll, kAny, kBallot, kSyncwarp };

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  detail::Stack stack;
  State state = State::kDone;
  unsigned tid = 0;  // linear index in the block
  uint3 idx{0, 0, 0};
  // while waiting at a warp operation or barrier
  Site site{"", "", 0};
  WarpOp op = WarpOp::kSyncwarp;
  unsigned mask = 0;
  int arg = 0;    // srcLane / delta / laneMask, or the predicate of a vote / barrier
  int width = kWarpSize;
  size_t bytes = 0;
  alignas(16) unsigned char in[16];
  alignas(16) unsigned char out[16];
  long long result = 0;  // votes and counting barriers
};

// Lanes of one warp waiting at one warp operation (usually the whole warp).
struct WarpGroup {
  Site site;
  WarpOp op;
  unsigned mask;
  unsigned arrived;
};

// The state of the block being run (blocks never overlap).
struct Block {
  std::vector<Fiber>* fibers = nullptr;
  unsigned nthreads = 0;
  std::vector<unsigned> rank_to_tid;
  std::vector<unsigned> tid_to_rank;
  std::vector<uint64_t> runnable;  // bit per priority rank
  std::vector<std::vector<WarpGroup>> waiting;  // per warp: the operations lanes wait at
  unsigned done = 0;
  unsigned at_barrier = 0;
  Site barrier_site{"", "", 0};
  std::string error;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_ctx;
#endif
  void (*invoke)(void*) = nullptr;
  void* invoke_arg = nullptr;
  std::string kernel;
  uint3 block_idx{0, 0, 0};
};

namespace detail {
inline uint3 thread_idx{0, 0, 0};
inline uint3 block_idx{0, 0, 0};
inline dim3 block_dim{1, 1, 1};
inline dim3 grid_dim{1, 1, 1};
inline Block* block = nullptr;
inline cudaError_t last_error = cudaSuccess;
inline std::string last_error_detail;
inline std::vector<LaunchRecord> log;
inline uint64_t launches = 0;
inline std::vector<Fiber>& fiber_pool() {
  static std::vector<Fiber> pool;
  return pool;
}
inline std::recursive_mutex& launch_mutex() {
  static std::recursive_mutex m;
  return m;
}

// Every __shared__ variable, registered the first time its declaration runs.
struct SharedRegion {
  void* ptr;
  size_t bytes;
};
inline std::vector<SharedRegion>& shared_regions() {
  static std::vector<SharedRegion> regions;
  return regions;
}

constexpr unsigned char kPoison = 0xFF;  // all-ones: a NaN in every float type, -1 in ints

inline void poison_shared() {
  for (const SharedRegion& r : shared_regions()) std::memset(r.ptr, kPoison, r.bytes);
}

// What a rewritten `__shared__ T name[dims];` runs once: the variable is a static, poisoned
// now (no thread of the running block can have written it yet: its declaration comes
// first) and before every later block.
inline bool register_shared(void* ptr, size_t bytes) {
  shared_regions().push_back(SharedRegion{ptr, bytes});
  if (config().poison_shared) std::memset(ptr, kPoison, bytes);
  return true;
}

inline void set_runnable(Block& b, unsigned tid) {
  Fiber& f = (*b.fibers)[tid];
  f.state = State::kRunnable;
  const unsigned r = b.tid_to_rank[tid];
  b.runnable[r >> 6] |= uint64_t{1} << (r & 63);
}

inline int next_runnable(Block& b) {
  for (size_t w = 0; w < b.runnable.size(); ++w) {
    if (b.runnable[w]) {
      const int bit = __builtin_ctzll(b.runnable[w]);
      b.runnable[w] &= b.runnable[w] - 1;
      return static_cast<int>(w * 64 + bit);
    }
  }
  return -1;
}

inline std::string thread_str(const Block& b, unsigned tid) {
  const Fiber& f = (*b.fibers)[tid];
  return "thread " + dim_str(f.idx.x, f.idx.y, f.idx.z);
}

// Records an error raised by the running fiber; the scheduler throws it.
inline void fail(Block& b, const std::string& what) {
  if (b.error.empty()) {
    b.error = "cudasim: kernel " + b.kernel + ", block " + dim_str(b.block_idx.x, b.block_idx.y, b.block_idx.z) +
              ", " + what;
  }
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield(Block& b) {
  Fiber* f = b.current;
#if defined(__x86_64__)
  cudasim_switch(&f->sp, b.scheduler_sp);
#else
  swapcontext(&f->ctx, &b.scheduler_ctx);
#endif
}

// A failed fiber never runs again: the scheduler stops the block at once.
[[noreturn]] inline void die(Block& b) {
  for (;;) yield(b);
}

inline void fiber_main(void* arg) {
  Block& b = *static_cast<Block*>(arg);
  Fiber& self = *b.current;
  try {
    b.invoke(b.invoke_arg);
  } catch (const std::exception& e) {
    fail(b, thread_str(b, self.tid) + ": exception in device code: " + e.what());
  } catch (...) {
    fail(b, thread_str(b, self.tid) + ": unknown exception in device code");
  }
  self.state = State::kDone;
  ++b.done;
  if (b.error.empty() && b.at_barrier > 0) {
    fail(b, thread_str(b, self.tid) + " exited while " + std::to_string(b.at_barrier) + " thread(s) wait at " +
                site_str(b.barrier_site) + ": a barrier must be reached by every thread of the block");
  }
  if (b.error.empty()) {
    const unsigned lane = self.tid % kWarpSize;
    for (const WarpGroup& g : b.waiting[self.tid / kWarpSize]) {
      if (g.mask >> lane & 1u) {
        fail(b, thread_str(b, self.tid) + " exited while " + std::to_string(g.arrived) +
                    " lane(s) of its warp wait for it at " + site_str(g.site) + " (their mask names lane " +
                    std::to_string(lane) + ")");
        break;
      }
    }
  }
  die(b);
}

#if !defined(__x86_64__)
inline void fiber_main_ucontext(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

inline void start_fiber(Block& b, Fiber& f) {
#if defined(__x86_64__)
  // Frame popped by cudasim_switch: [fpucw|mxcsr] r15 r14 r13 r12 rbx rbp ret
  uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack.lo + f.stack.size) & ~uintptr_t{15});
  uint64_t* sp = top - 11;  // ret lands on top - 3: rsp is 16-aligned at the trampoline's call
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memset(sp, 0, 2 * sizeof(uint64_t));
  std::memcpy(reinterpret_cast<char*>(sp), &fpucw, sizeof(fpucw));
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof(mxcsr));
  sp[2] = 0;                                                   // r15
  sp[3] = 0;                                                   // r14
  sp[4] = reinterpret_cast<uint64_t>(&fiber_main);             // r13: entry
  sp[5] = reinterpret_cast<uint64_t>(&b);                      // r12: argument
  sp[6] = 0;                                                   // rbx
  sp[7] = 0;                                                   // rbp
  sp[8] = reinterpret_cast<uint64_t>(&cudasim_fiber_start);    // return address
  sp[9] = 0;
  sp[10] = 0;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.lo;
  f.ctx.uc_stack.ss_size = f.stack.size;
  f.ctx.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&b);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main_ucontext), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xFFFFFFFFu));
#endif
}

inline void resume(Block& b, Fiber& f) {
  b.current = &f;
  thread_idx = f.idx;
#if defined(__x86_64__)
  cudasim_switch(&b.scheduler_sp, f.sp);
#else
  swapcontext(&b.scheduler_ctx, &f.ctx);
#endif
}

inline std::string describe_waits(const Block& b) {
  // Group the threads that have not finished by where they wait.
  std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
  for (unsigned t = 0; t < b.nthreads; ++t) {
    const Fiber& f = (*b.fibers)[t];
    std::string where;
    if (f.state == State::kDone) continue;
    if (f.state == State::kBarrier) {
      where = "wait at " + site_str(f.site);
    } else if (f.state == State::kWarp) {
      std::ostringstream os;
      os << "wait at " << site_str(f.site) << " with mask 0x" << std::hex << f.mask;
      where = os.str();
    } else {
      where = "are runnable";
    }
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == where; });
    if (it == groups.end()) {
      groups.push_back({where, {t}});
    } else {
      it->second.push_back(t);
    }
  }
  std::string out;
  for (const auto& g : groups) {
    if (!out.empty()) out += "; ";
    out += "threads " + ranges(g.second) + " " + g.first;
  }
  return out;
}

// Runs one block to completion; returns an error message or "".
inline std::string run_block(Block& b) {
  const Config& cfg = config();
  const unsigned n = b.nthreads;
  std::vector<Fiber>& fibers = *b.fibers;
  // Priorities.
  b.rank_to_tid.resize(n);
  for (unsigned t = 0; t < n; ++t) b.rank_to_tid[t] = t;
  if (cfg.thread_order == Order::kReverse) {
    std::reverse(b.rank_to_tid.begin(), b.rank_to_tid.end());
  } else if (cfg.thread_order == Order::kRandom) {
    const uint64_t block_lin =
        (static_cast<uint64_t>(b.block_idx.z) * grid_dim.y + b.block_idx.y) * grid_dim.x + b.block_idx.x;
    std::mt19937_64 rng(cfg.seed * 0x9E3779B97F4A7C15ull + launches * 0xBF58476D1CE4E5B9ull + block_lin);
    const unsigned warps = (n + kWarpSize - 1) / kWarpSize;
    std::vector<unsigned> warp_order(warps);
    for (unsigned w = 0; w < warps; ++w) warp_order[w] = w;
    std::shuffle(warp_order.begin(), warp_order.end(), rng);
    unsigned r = 0;
    for (unsigned w : warp_order) {
      const unsigned lo = w * kWarpSize, hi = std::min(n, lo + kWarpSize);
      std::vector<unsigned> lanes;
      for (unsigned t = lo; t < hi; ++t) lanes.push_back(t);
      std::shuffle(lanes.begin(), lanes.end(), rng);
      for (unsigned t : lanes) b.rank_to_tid[r++] = t;
    }
  }
  b.tid_to_rank.resize(n);
  for (unsigned r = 0; r < n; ++r) b.tid_to_rank[b.rank_to_tid[r]] = r;
  b.runnable.assign((n + 63) / 64, 0);
  b.waiting.resize((n + kWarpSize - 1) / kWarpSize);
  for (auto& w : b.waiting) w.clear();
  b.done = 0;
  b.at_barrier = 0;
  b.error.clear();
  const dim3 bd = block_dim;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    f.tid = t;
    f.idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
    f.state = State::kRunnable;
    start_fiber(b, f);
    set_runnable(b, t);
  }
  if (cfg.poison_shared) poison_shared();
  for (;;) {
    const int r = next_runnable(b);
    if (r < 0) break;
    resume(b, fibers[b.rank_to_tid[static_cast<unsigned>(r)]]);
    if (!b.error.empty()) return b.error;
  }
  if (b.done != n) {
    fail(b, "deadlock: " + describe_waits(b));
    return b.error;
  }
  return "";
}

}  // namespace detail

// ------------------------------------------------------------------- device operations
namespace detail {

inline Block& current_block() {
  Block* b = block;
  if (b == nullptr || b->current == nullptr) {
    throw std::logic_error("cudasim: a device operation was called outside a kernel");
  }
  return *b;
}

inline void barrier(const Site& site, int pred, long long* result) {
  Block& b = current_block();
  Fiber& f = *b.current;
  if (b.done > 0) {
    std::vector<unsigned> gone;
    for (unsigned t = 0; t < b.nthreads; ++t) {
      if ((*b.fibers)[t].state == State::kDone) gone.push_back(t);
    }
    fail(b, thread_str(b, f.tid) + " reached " + site_str(site) + " after threads " + ranges(gone) +
                " exited: a barrier must be reached by every thread of the block");
    die(b);
  }
  if (b.at_barrier > 0 && !same_site(site, b.barrier_site)) {
    fail(b, thread_str(b, f.tid) + " reached " + site_str(site) + " while " + std::to_string(b.at_barrier) +
                " thread(s) wait at " + site_str(b.barrier_site) + " (divergent barriers)");
    die(b);
  }
  const unsigned lane = f.tid % kWarpSize;
  for (const WarpGroup& g : b.waiting[f.tid / kWarpSize]) {
    if (g.mask >> lane & 1u) {
      fail(b, thread_str(b, f.tid) + " reached " + site_str(site) + " while " + std::to_string(g.arrived) +
                  " lane(s) of its warp wait for it at " + site_str(g.site));
      die(b);
    }
  }
  f.state = State::kBarrier;
  f.site = site;
  f.arg = pred;
  if (b.at_barrier++ == 0) b.barrier_site = site;
  if (b.at_barrier == b.nthreads) {
    long long count = 0;
    for (unsigned t = 0; t < b.nthreads; ++t) count += (*b.fibers)[t].arg != 0;
    for (unsigned t = 0; t < b.nthreads; ++t) {
      (*b.fibers)[t].result = count;
      set_runnable(b, t);
    }
    b.at_barrier = 0;
  }
  yield(b);
  if (result) *result = f.result;
}

inline const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx:
      return "__shfl_sync";
    case WarpOp::kShflUp:
      return "__shfl_up_sync";
    case WarpOp::kShflDown:
      return "__shfl_down_sync";
    case WarpOp::kShflXor:
      return "__shfl_xor_sync";
    case WarpOp::kAll:
      return "__all_sync";
    case WarpOp::kAny:
      return "__any_sync";
    case WarpOp::kBallot:
      return "__ballot_sync";
    default:
      return "__syncwarp";
  }
}

// Completes the warp operation every lane of `mask` (warp starting at w0) is waiting at.
inline void resolve_warp(Block& b, unsigned w0, unsigned mask) {
  std::vector<Fiber>& fs = *b.fibers;
  const Fiber& first = fs[w0 + static_cast<unsigned>(__builtin_ctz(mask))];
  const WarpOp op = first.op;
  if (op == WarpOp::kAll || op == WarpOp::kAny || op == WarpOp::kBallot) {
    unsigned ballot = 0;
    for (unsigned l = 0; l < kWarpSize; ++l) {
      if ((mask >> l & 1u) && fs[w0 + l].arg != 0) ballot |= 1u << l;
    }
    const long long r = op == WarpOp::kBallot ? static_cast<long long>(ballot)
                        : op == WarpOp::kAll  ? (ballot == mask ? 1 : 0)
                                              : (ballot != 0 ? 1 : 0);
    for (unsigned l = 0; l < kWarpSize; ++l) {
      if (mask >> l & 1u) fs[w0 + l].result = r;
    }
  } else if (op != WarpOp::kSyncwarp) {
    for (unsigned l = 0; l < kWarpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& f = fs[w0 + l];
      const int width = f.width;
      const int lane = static_cast<int>(l);
      const int seg = lane & ~(width - 1);
      int src = lane;
      switch (op) {
        case WarpOp::kShflIdx:
          src = seg + (((f.arg % width) + width) % width);
          break;
        case WarpOp::kShflUp:
          if ((lane & (width - 1)) - f.arg >= 0) src = lane - f.arg;
          break;
        case WarpOp::kShflDown:
          if ((lane & (width - 1)) + f.arg < width) src = lane + f.arg;
          break;
        default: {  // xor
          const int s = lane ^ f.arg;
          if (s >= 0 && s < ((lane + width) & ~(width - 1))) src = s;
          break;
        }
      }
      if (src != lane && !(mask >> src & 1u)) {
        std::ostringstream os;
        os << "mask 0x" << std::hex << mask;
        fail(b, thread_str(b, w0 + l) + " at " + site_str(f.site) + " reads lane " + std::to_string(src) +
                    ", which the " + os.str() + " does not name (undefined on hardware)");
        return;
      }
      std::memcpy(f.out, fs[w0 + static_cast<unsigned>(src)].in, f.bytes);
    }
  }
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (mask >> l & 1u) set_runnable(b, w0 + l);
  }
}

inline void warp_op(const Site& site, WarpOp op, unsigned mask, const void* value, size_t bytes, int arg,
                    int width) {
  Block& b = current_block();
  Fiber& f = *b.current;
  const unsigned lane = f.tid % kWarpSize, w0 = f.tid - lane;
  const unsigned lanes = std::min<unsigned>(kWarpSize, b.nthreads - w0);
  const auto mask_str = [mask] {  // only for messages: formatting is slow on the hot path
    std::ostringstream os;
    os << "mask 0x" << std::hex << mask;
    return os.str();
  };
  if (!(mask >> lane & 1u)) {
    fail(b, thread_str(b, f.tid) + " called " + site_str(site) + " with a " + mask_str() +
                " that does not name its own lane " + std::to_string(lane));
    die(b);
  }
  if (lanes < kWarpSize && (mask >> lanes) != 0) {
    fail(b, thread_str(b, f.tid) + " called " + site_str(site) + " with a " + mask_str() + " naming lane " +
                std::to_string(lanes + static_cast<unsigned>(__builtin_ctz(mask >> lanes))) +
                ", which does not exist (the block has " + std::to_string(b.nthreads) + " threads)");
    die(b);
  }
  if (op <= WarpOp::kShflXor && (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)) {
    fail(b, thread_str(b, f.tid) + ": " + site_str(site) + " width " + std::to_string(width) +
                " is not a power of two in [1, 32]");
    die(b);
  }
  std::vector<WarpGroup>& groups = b.waiting[f.tid / kWarpSize];
  WarpGroup* group = nullptr;
  for (WarpGroup& g : groups) {
    if (g.mask & mask) {  // lanes named by both masks
      if (!(g.mask >> lane & 1u) || !same_site(g.site, site) || g.op != op || g.mask != mask) {
        std::ostringstream os;
        os << " while " << g.arrived << " lane(s) of its warp wait at " << site_str(g.site) << " with mask 0x"
           << std::hex << g.mask << " (both masks name lane " << std::dec << __builtin_ctz(g.mask & mask) << ")";
        fail(b, thread_str(b, f.tid) + " called " + site_str(site) + " with a " + mask_str() + os.str());
        die(b);
      }
      group = &g;
      break;
    }
  }
  if (group == nullptr) {  // the first lane to arrive: every other lane named must be able to come
    for (unsigned l = 0; l < lanes; ++l) {
      if (l == lane || !(mask >> l & 1u)) continue;
      const Fiber& o = (*b.fibers)[w0 + l];
      if (o.state == State::kDone || o.state == State::kBarrier) {
        fail(b, thread_str(b, f.tid) + " called " + site_str(site) + " with a " + mask_str() + " naming lane " +
                    std::to_string(l) + ", which " +
                    (o.state == State::kDone ? std::string("has exited") : "waits at " + site_str(o.site)));
        die(b);
      }
    }
    groups.push_back(WarpGroup{site, op, mask, 0});
    group = &groups.back();
  }
  f.state = State::kWarp;
  f.site = site;
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.bytes = bytes;
  if (bytes) std::memcpy(f.in, value, bytes);
  if (++group->arrived == static_cast<unsigned>(__builtin_popcount(mask))) {
    groups.erase(groups.begin() + (group - groups.data()));
    resolve_warp(b, w0, mask);
  }
  yield(b);
}

template <typename T>
inline T shfl(const Site& site, WarpOp op, unsigned mask, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "cudasim: unsupported shuffle type");
  warp_op(site, op, mask, &var, sizeof(T), arg, width);
  T out;
  std::memcpy(&out, current_block().current->out, sizeof(T));
  return out;
}

inline long long vote(const Site& site, WarpOp op, unsigned mask, int pred) {
  warp_op(site, op, mask, nullptr, 0, pred, kWarpSize);
  return current_block().current->result;
}

}  // namespace detail

// --------------------------------------------------------------------------- launching
inline int device_attribute(cudaDeviceAttr attr) {
  const Config& c = config();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      return c.sm_count;
    case cudaDevAttrMaxGridDimX:
      return static_cast<int>(c.max_grid_x);
    case cudaDevAttrMaxGridDimY:
      return static_cast<int>(c.max_grid_y);
    case cudaDevAttrMaxGridDimZ:
      return static_cast<int>(c.max_grid_z);
    case cudaDevAttrMaxThreadsPerBlock:
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY:
      return 1024;
    case cudaDevAttrMaxBlockDimZ:
      return 64;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      return 48 * 1024;
    case cudaDevAttrWarpSize:
      return kWarpSize;
    case cudaDevAttrComputeCapabilityMajor:
      return 9;
    case cudaDevAttrComputeCapabilityMinor:
      return 0;
    default:
      return 0;
  }
}

inline std::string check_launch(dim3 grid, dim3 block, size_t shmem) {
  const Config& c = config();
  std::ostringstream os;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    os << "grid " << dim_str(grid.x, grid.y, grid.z) << " has a zero dimension";
  } else if (grid.x > c.max_grid_x || grid.y > c.max_grid_y || grid.z > c.max_grid_z) {
    os << "grid " << dim_str(grid.x, grid.y, grid.z) << " exceeds the device limits "
       << dim_str(c.max_grid_x, c.max_grid_y, c.max_grid_z);
  } else if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
             static_cast<uint64_t>(block.x) * block.y * block.z > kMaxThreadsPerBlock) {
    os << "block " << dim_str(block.x, block.y, block.z) << " is not a valid block shape (at most 1024 threads)";
  } else if (shmem > 0) {
    os << "dynamic shared memory is not modelled (" << shmem << " bytes requested)";
  }
  return os.str();
}

// What `kernel<<<grid, block, shmem, stream>>>(args...)` becomes.
struct Launch {
  const char* kernel;
  dim3 grid, block;
  size_t shmem;

  template <typename... P, typename... A>
  void operator()(void (*fn)(P...), A&&... args) const {
    using Params = std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...>;
    struct Call {
      void (*fn)(P...);
      Params params;
    };
    // Kernel parameters are copied once at launch, like CUDA's parameter buffer, and
    // passed by value to every thread.
    Call call{fn, Params(std::forward<A>(args)...)};
    run(&call, [](void* p) {
      Call& c = *static_cast<Call*>(p);
      std::apply(c.fn, c.params);
    });
  }

  void run(void* arg, void (*invoke)(void*)) const {
    std::lock_guard<std::recursive_mutex> lock(detail::launch_mutex());
    if (detail::block != nullptr) {
      throw std::logic_error("cudasim: a kernel launched another kernel (dynamic parallelism is not modelled)");
    }
    if (detail::log.size() < 100000) detail::log.push_back(LaunchRecord{kernel, grid, block});
    const std::string bad = check_launch(grid, block, shmem);
    if (!bad.empty()) {  // like CUDA: nothing runs, the error is reported by cudaGetLastError
      detail::last_error = cudaErrorInvalidConfiguration;
      detail::last_error_detail = std::string("kernel ") + kernel + ": " + bad;
      return;
    }
    const Config& cfg = config();
    const unsigned n = block.x * block.y * block.z;
    std::vector<Fiber>& pool = detail::fiber_pool();
    while (pool.size() < n) {
      pool.emplace_back();
      pool.back().stack = detail::make_stack(kStackBytes);
    }
    detail::grid_dim = grid;
    detail::block_dim = block;
    const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> order(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    if (cfg.block_order == Order::kReverse) {
      std::reverse(order.begin(), order.end());
    } else if (cfg.block_order == Order::kRandom) {
      std::mt19937_64 rng(cfg.seed * 0xD1B54A32D192ED03ull + detail::launches);
      std::shuffle(order.begin(), order.end(), rng);
    }
    Block b;
    b.fibers = &pool;
    b.nthreads = n;
    b.invoke = invoke;
    b.invoke_arg = arg;
    b.kernel = kernel;
    struct Reset {
      ~Reset() {
        detail::block = nullptr;
        ++detail::launches;
      }
    } reset;
    detail::block = &b;
    for (uint64_t lin : order) {
      b.block_idx = uint3{static_cast<unsigned>(lin % grid.x), static_cast<unsigned>((lin / grid.x) % grid.y),
                          static_cast<unsigned>(lin / (static_cast<uint64_t>(grid.x) * grid.y))};
      detail::block_idx = b.block_idx;
      const std::string err = detail::run_block(b);
      if (!err.empty()) throw std::runtime_error(err);
    }
  }
};

inline Launch launch(const char* kernel, dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t = nullptr) {
  return Launch{kernel, grid, block, shmem};
}

// --------------------------------------------------------------- control (test harness)
inline void configure(Order thread_order, Order block_order, uint64_t seed, int sm_count, unsigned max_grid_y) {
  std::lock_guard<std::recursive_mutex> lock(detail::launch_mutex());
  Config& c = config();
  c.thread_order = thread_order;
  c.block_order = block_order;
  c.seed = seed;
  c.sm_count = sm_count;
  c.max_grid_y = max_grid_y;
  detail::launches = 0;
  detail::log.clear();
  detail::last_error = cudaSuccess;
}

inline std::string launch_log() {
  std::ostringstream os;
  for (const LaunchRecord& r : detail::log) {
    os << r.kernel << " grid=" << dim_str(r.grid.x, r.grid.y, r.grid.z)
       << " block=" << dim_str(r.block.x, r.block.y, r.block.z) << "\n";
  }
  return os.str();
}

}  // namespace cudasim

// ---------------------------------------------------------------------- runtime API
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cudasim::detail::last_error;
  cudasim::detail::last_error = cudaSuccess;
  return e;
}

inline cudaError_t cudaPeekAtLastError() { return cudasim::detail::last_error; }

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidValue:
      return "invalid argument";
    default:
      return "unspecified launch failure";
  }
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *value = cudasim::device_attribute(attr);
  return cudaSuccess;
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ------------------------------------------------------------- device-side built-ins
namespace cudasim {
namespace device {

constexpr int warpSize = kWarpSize;

template <typename T>
inline T shfl_sync(const Site& s, unsigned mask, T var, int src, int width = kWarpSize) {
  return detail::shfl(s, WarpOp::kShflIdx, mask, var, src, width);
}
template <typename T>
inline T shfl_up_sync(const Site& s, unsigned mask, T var, unsigned delta, int width = kWarpSize) {
  return detail::shfl(s, WarpOp::kShflUp, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T shfl_down_sync(const Site& s, unsigned mask, T var, unsigned delta, int width = kWarpSize) {
  return detail::shfl(s, WarpOp::kShflDown, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T shfl_xor_sync(const Site& s, unsigned mask, T var, int lane_mask, int width = kWarpSize) {
  return detail::shfl(s, WarpOp::kShflXor, mask, var, lane_mask, width);
}
inline int all_sync(const Site& s, unsigned mask, int pred) {
  return static_cast<int>(detail::vote(s, WarpOp::kAll, mask, pred != 0));
}
inline int any_sync(const Site& s, unsigned mask, int pred) {
  return static_cast<int>(detail::vote(s, WarpOp::kAny, mask, pred != 0));
}
inline unsigned ballot_sync(const Site& s, unsigned mask, int pred) {
  return static_cast<unsigned>(detail::vote(s, WarpOp::kBallot, mask, pred != 0));
}
inline void syncwarp(const Site& s, unsigned mask = 0xffffffffu) {
  detail::warp_op(s, WarpOp::kSyncwarp, mask, nullptr, 0, 0, kWarpSize);
}
inline void syncthreads(const Site& s) { detail::barrier(s, 0, nullptr); }
inline int syncthreads_count(const Site& s, int pred) {
  long long r = 0;
  detail::barrier(s, pred != 0, &r);
  return static_cast<int>(r);
}
inline int syncthreads_and(const Site& s, int pred) {
  return syncthreads_count(s, pred) == static_cast<int>(detail::current_block().nthreads);
}
inline int syncthreads_or(const Site& s, int pred) { return syncthreads_count(s, pred) != 0; }

// Lanes of the caller's warp that have not exited.
inline unsigned activemask() {
  Block& b = detail::current_block();
  const unsigned w0 = b.current->tid - b.current->tid % kWarpSize;
  unsigned m = 0;
  for (unsigned l = 0; l < kWarpSize && w0 + l < b.nthreads; ++l) {
    if ((*b.fibers)[w0 + l].state != State::kDone) m |= 1u << l;
  }
  return m;
}

}  // namespace device
}  // namespace cudasim

// Arithmetic intrinsics: one IEEE-754 operation each, round to nearest (the build uses
// -ffp-contract=off, so none is fused with its neighbours).
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline long long __double_as_longlong(double x) {
  long long u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline double __longlong_as_double(long long u) {
  double x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline int __float_as_int(float x) {
  int u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __int_as_float(int u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline unsigned int __float_as_uint(float x) {
  unsigned int u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned int __brev(unsigned int x) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline void __threadfence() { asm volatile("" ::: "memory"); }
inline void __threadfence_block() { asm volatile("" ::: "memory"); }

// Atomics. Fibers never switch inside one, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}
template <typename T>
inline T atomicSub(T* address, T val) {
  const T old = *address;
  *address = old - val;
  return old;
}
template <typename T>
inline T atomicExch(T* address, T val) {
  const T old = *address;
  *address = val;
  return old;
}
template <typename T>
inline T atomicMin(T* address, T val) {
  const T old = *address;
  *address = val < old ? val : old;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T val) {
  const T old = *address;
  *address = val > old ? val : old;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
  const T old = *address;
  if (old == compare) *address = val;
  return old;
}
template <typename T>
inline T atomicAnd(T* address, T val) {
  const T old = *address;
  *address = old & val;
  return old;
}
template <typename T>
inline T atomicOr(T* address, T val) {
  const T old = *address;
  *address = old | val;
  return old;
}
template <typename T>
inline T atomicXor(T* address, T val) {
  const T old = *address;
  *address = old ^ val;
  return old;
}
