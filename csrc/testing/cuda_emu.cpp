// Runtime of the host CUDA emulation (cuda_emu.h): launch, CTA barrier, warp shuffles, and the
// two ways of running a CTA's threads (fibers on the calling thread, or real OS threads).
#include "cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace kd_emu {

thread_local uint3 t_threadIdx = {0, 0, 0};
thread_local uint3 t_blockIdx = {0, 0, 0};
thread_local dim3 t_blockDim = dim3(1, 1, 1);
thread_local dim3 t_gridDim = dim3(1, 1, 1);

namespace {

enum Mode { FIBERS, THREADS };

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;

struct Warp {
  std::mutex mu;  // threads mode: this warp's shuffles synchronize here only
  std::condition_variable cv;
  int arrived = 0;
  uint64_t gen = 0;
  unsigned mask = 0;    // mask of the shuffle in progress
  unsigned live = 0;    // lanes that exist and have not exited
  uint64_t buf[2][32];  // double buffer: a shuffle's values, by lane
  uint64_t seq[2][32];  // the writer's shuffle count, to catch divergent shuffle sequences
};

struct Cta {
  Mode mode = FIBERS;
  int n = 0;     // threads per CTA
  int live = 0;  // threads that have not exited
  std::mutex mu;  // threads mode: the CTA barrier
  std::condition_variable cv;
  int arrived = 0;
  uint64_t gen = 0;
  const char* file = nullptr;
  int line = 0;
  Warp warps[kMaxWarps];
  std::atomic<bool> fault{false};
  std::mutex msg_mu;
  std::string msg;
  long long progress = 0;  // fibers mode only: arrivals, releases, exits (deadlock detection)
};

struct ThreadCtx {
  int tid = 0, lane = 0, warp = 0;
  uint64_t shfl_seq = 0;
};

std::mutex g_launch_mu;  // one launch at a time (static __shared__ storage, the fiber pool)
Cta g_cta;
thread_local ThreadCtx* t_self = nullptr;
thread_local int t_last_error = 0;
std::string g_last_fault;
std::atomic<long long> g_launches{0}, g_ctas{0}, g_syncs{0}, g_shuffles{0};

void fault(Cta& c, const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(c.msg_mu);
    if (c.msg.empty()) c.msg = why;
  }
  c.fault.store(true);
  if (c.mode == THREADS) {  // wake every waiter; each re-checks the fault flag
    { std::lock_guard<std::mutex> lk(c.mu); }
    c.cv.notify_all();
    for (int w = 0; w < (c.n + 31) / 32; ++w) {
      { std::lock_guard<std::mutex> lk(c.warps[w].mu); }
      c.warps[w].cv.notify_all();
    }
  }
}

std::string where(const char* file, int line) {
  const char* slash = file ? strrchr(file, '/') : nullptr;
  return std::string(slash ? slash + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}

// ---- fibers -----------------------------------------------------------------------------------
constexpr size_t kStack = 256 * 1024;

struct Fiber {
  void* sp = nullptr;
  char* base = nullptr;  // mapping: guard page, then the stack
  bool done = false;
  ThreadCtx ctx;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

std::vector<Fiber> g_fibers;
Fiber* g_cur = nullptr;
void* g_sched_sp = nullptr;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif

}  // namespace
}  // namespace kd_emu

#if defined(__x86_64__)
// Save the callee-saved registers on the current stack, store its pointer in *save, switch to
// `to` and restore the registers saved there (SysV x86-64 ABI).
extern "C" void kd_emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl kd_emu_switch
  .hidden kd_emu_switch
  .type kd_emu_switch, @function
kd_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kd_emu_switch, .-kd_emu_switch
)");
#endif

namespace kd_emu {
namespace {

void on_exit(Cta& c);

void yield() {
#if defined(__x86_64__)
  kd_emu_switch(&g_cur->sp, g_sched_sp);
#else
  swapcontext(&g_cur->uc, &g_sched_uc);
#endif
}

[[noreturn]] void fiber_entry() {
  Fiber* f = g_cur;
  g_body(g_body_ctx);
  on_exit(g_cta);
  f->done = true;
  yield();  // never resumed
  __builtin_unreachable();
}

void fiber_init(Fiber& f) {
  if (!f.base) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      perror("kd_emu: mmap of a fiber stack");
      abort();
    }
    mprotect(p, page, PROT_NONE);  // overflow guard
    f.base = static_cast<char*>(p);
  }
  f.done = false;
#if defined(__x86_64__)
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.base) + page + kStack) & ~(uintptr_t)15;
  void** frame = reinterpret_cast<void**>(top - 64);
  for (int k = 0; k < 6; ++k) frame[k] = nullptr;                   // r15 r14 r13 r12 rbx rbp
  frame[6] = reinterpret_cast<void*>(&fiber_entry);                 // `ret` target, at top - 16
  frame[7] = nullptr;                                               // fake return address
  f.sp = frame;  // at entry rsp = top - 8: aligned as after a call
#else
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.base + page;
  f.uc.uc_stack.ss_size = kStack;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, (void (*)())fiber_entry, 0);
#endif
}

void set_thread_index(int tid, dim3 block) {
  t_threadIdx = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
}

void resume(Fiber& f, dim3 block) {
  g_cur = &f;
  t_self = &f.ctx;
  set_thread_index(f.ctx.tid, block);
#if defined(__x86_64__)
  kd_emu_switch(&g_sched_sp, f.sp);
#else
  swapcontext(&g_sched_uc, &f.uc);
#endif
}

// ---- CTA state ----------------------------------------------------------------------------------
void reset_cta(Cta& c, Mode mode, int n) {
  c.mode = mode;
  c.n = n;
  c.live = n;
  c.arrived = 0;
  c.gen = 0;
  c.file = nullptr;
  c.line = 0;
  c.progress = 0;
  for (int w = 0; w < (n + 31) / 32; ++w) {
    Warp& wp = c.warps[w];
    wp.arrived = 0;
    wp.gen = 0;
    wp.mask = 0;
    const int lanes = n - 32 * w >= 32 ? 32 : n - 32 * w;
    wp.live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
}

std::string describe_waiters(Cta& c) {
  std::string s = std::to_string(c.arrived) + " of " + std::to_string(c.live) +
                  " live threads wait at __syncthreads";
  if (c.arrived) s += " (" + where(c.file, c.line) + ")";
  for (int w = 0; w < (c.n + 31) / 32; ++w)
    if (c.warps[w].arrived)
      s += "; warp " + std::to_string(w) + ": " + std::to_string(c.warps[w].arrived) +
           " lanes wait in a shuffle";
  return s;
}

// Arrive at the CTA barrier; true when this arrival released it.
bool cta_arrive(Cta& c, const char* file, int line) {
  if (c.arrived == 0) {
    c.file = file;
    c.line = line;
  } else if (c.line != line || strcmp(c.file, file) != 0) {
    fault(c, "divergent __syncthreads: threads wait at " + where(c.file, c.line) + " and at " +
                 where(file, line));
  }
  if (c.mode == FIBERS) ++c.progress;
  if (++c.arrived == c.live) {
    c.arrived = 0;
    ++c.gen;
    g_syncs.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  return false;
}

bool warp_arrive(Cta& c, Warp& w, unsigned mask) {
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    fault(c, "warp shuffles with different masks at the same time");
  }
  if (c.mode == FIBERS) ++c.progress;  // threads mode: the warps' barriers hold different locks
  if (++w.arrived == __builtin_popcount(mask)) {
    w.arrived = 0;
    ++w.gen;
    g_shuffles.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  return false;
}

constexpr auto kDeadlock = std::chrono::seconds(30);

template <class Pred>
void thread_wait(Cta& c, std::condition_variable& cv, std::unique_lock<std::mutex>& lk, Pred done) {
  if (!cv.wait_for(lk, kDeadlock, [&] { return done() || c.fault.load(); })) {
    lk.unlock();
    fault(c, "deadlock: no barrier progress for 30 s (" + describe_waiters(c) + ")");
    lk.lock();
  }
}

void warp_barrier(Cta& c, Warp& w, unsigned mask) {
  if (c.mode == THREADS) {
    std::unique_lock<std::mutex> lk(w.mu);
    if (warp_arrive(c, w, mask)) {
      lk.unlock();
      w.cv.notify_all();
      return;
    }
    const uint64_t g = w.gen;
    thread_wait(c, w.cv, lk, [&] { return w.gen != g; });
  } else {
    if (warp_arrive(c, w, mask)) return;
    const uint64_t g = w.gen;
    while (w.gen == g && !c.fault.load()) yield();
    while (c.fault.load()) yield();  // the scheduler abandons the CTA
  }
}

void on_exit(Cta& c) {
  ThreadCtx& me = *t_self;
  Warp& w = c.warps[me.warp];
  if (c.mode == THREADS) {
    bool bad;
    {
      std::lock_guard<std::mutex> lk(w.mu);
      w.live &= ~(1u << me.lane);
      bad = w.arrived && (w.mask >> me.lane & 1u);
    }
    if (bad) fault(c, "a lane exited while its warp waits for it in a shuffle");
    std::unique_lock<std::mutex> lk(c.mu);
    --c.live;
    if (c.arrived && c.arrived == c.live) {
      c.arrived = 0;
      ++c.gen;
      g_syncs.fetch_add(1, std::memory_order_relaxed);
      lk.unlock();
      c.cv.notify_all();
    }
  } else {
    w.live &= ~(1u << me.lane);
    if (w.arrived && (w.mask >> me.lane & 1u))
      fault(c, "a lane exited while its warp waits for it in a shuffle");
    --c.live;
    ++c.progress;
    if (c.arrived && c.arrived == c.live) {
      c.arrived = 0;
      ++c.gen;
      g_syncs.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

// ---- the two executors -----------------------------------------------------------------------------
int run_fibers(dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  const int n = (int)(block.x * block.y * block.z);
  if ((int)g_fibers.size() < n) g_fibers.resize(n);
  g_body = body;
  g_body_ctx = ctx;
  t_blockDim = block;
  t_gridDim = grid;
  ThreadCtx* saved_self = t_self;
  const uint3 saved_idx = t_threadIdx, saved_bidx = t_blockIdx;
  int rc = 0;
  for (unsigned bz = 0; bz < grid.z && !rc; ++bz)
    for (unsigned by = 0; by < grid.y && !rc; ++by)
      for (unsigned bx = 0; bx < grid.x && !rc; ++bx) {
        Cta& c = g_cta;
        reset_cta(c, FIBERS, n);
        t_blockIdx = uint3{bx, by, bz};
        for (int i = 0; i < n; ++i) {
          fiber_init(g_fibers[i]);
          g_fibers[i].ctx = ThreadCtx{i, i % 32, i / 32, 0};
        }
        // Warp-greedy schedule: one warp at a time runs as far as it can (its lanes are resumed
        // until none of them makes progress, i.e. all wait at __syncthreads or have exited)
        // before the next warp runs, so a warp races ahead of the others as far as the barriers
        // allow: a missing __syncthreads lets it overwrite shared memory another warp has not
        // read yet, or read what another has not written. Even CTAs take the warps in
        // ascending order, odd CTAs in descending order (both directions of a race).
        const int nw = (n + 31) / 32;
        const bool reverse = ((bx + by + bz) & 1u) != 0;
        int remaining = n;
        while (remaining > 0 && !c.fault.load()) {
          const long long p0 = c.progress;
          for (int wi = 0; wi < nw && !c.fault.load(); ++wi) {
            const int w = reverse ? nw - 1 - wi : wi;
            const int lo = 32 * w, hi = lo + 32 < n ? lo + 32 : n;
            long long pw;
            do {
              pw = c.progress;
              for (int i = lo; i < hi && !c.fault.load(); ++i) {
                Fiber& f = g_fibers[i];
                if (f.done) continue;
                resume(f, block);
                if (f.done) --remaining;
              }
            } while (c.progress != pw && !c.fault.load());
          }
          if (remaining > 0 && c.progress == p0 && !c.fault.load())
            fault(c, "deadlock: " + describe_waiters(c));
        }
        g_ctas.fetch_add(1, std::memory_order_relaxed);
        if (c.fault.load()) rc = cudaErrorLaunchFailure;
      }
  t_self = saved_self;
  t_threadIdx = saved_idx;
  t_blockIdx = saved_bidx;
  return rc;
}

struct EndBarrier {  // all OS threads of the launch, between CTAs
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0, n = 0;
  uint64_t gen = 0;
  template <class F>
  void wait(F completion) {
    std::unique_lock<std::mutex> lk(mu);
    if (++arrived == n) {
      completion();
      arrived = 0;
      ++gen;
      lk.unlock();
      cv.notify_all();
      return;
    }
    const uint64_t g = gen;
    cv.wait(lk, [&] { return gen != g; });
  }
};

int run_threads(dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  const int n = (int)(block.x * block.y * block.z);
  Cta& c = g_cta;
  reset_cta(c, THREADS, n);
  EndBarrier end;
  end.n = n;
  std::atomic<int> rc{0};
  auto worker = [&](int tid) {
    ThreadCtx me{tid, tid % 32, tid / 32, 0};
    t_self = &me;
    t_blockDim = block;
    t_gridDim = grid;
    set_thread_index(tid, block);
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          t_blockIdx = uint3{bx, by, bz};
          me.shfl_seq = 0;
          const bool skip = rc.load() != 0;
          if (!skip) {
            body(ctx);
            on_exit(c);
          }
          end.wait([&] {  // the last thread of the CTA: record the result, reset for the next
            g_ctas.fetch_add(1, std::memory_order_relaxed);
            if (c.fault.load()) rc.store(cudaErrorLaunchFailure);
            reset_cta(c, THREADS, n);
          });
        }
  };
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int tid = 0; tid < n; ++tid) threads.emplace_back(worker, tid);
  for (auto& t : threads) t.join();
  return rc.load();
}

}  // namespace

// ---- device-side API ---------------------------------------------------------------------------
int lane_id() { return t_self ? t_self->lane : 0; }

void syncthreads(const char* file, int line) {
  Cta& c = g_cta;
  if (c.mode == THREADS) {
    std::unique_lock<std::mutex> lk(c.mu);
    if (cta_arrive(c, file, line)) {
      lk.unlock();
      c.cv.notify_all();
      return;
    }
    const uint64_t g = c.gen;
    thread_wait(c, c.cv, lk, [&] { return c.gen != g; });
  } else {
    if (cta_arrive(c, file, line)) return;
    const uint64_t g = c.gen;
    while (c.gen == g && !c.fault.load()) yield();
    while (c.fault.load()) yield();
  }
}

uint64_t shfl(unsigned mask, uint64_t bits, int src) {
  Cta& c = g_cta;
  ThreadCtx& me = *t_self;
  Warp& w = c.warps[me.warp];
  if (!(mask >> me.lane & 1u)) {
    fault(c, "shuffle by lane " + std::to_string(me.lane) + " not in its mask");
    return bits;
  }
  unsigned live;
  if (c.mode == THREADS) {
    std::lock_guard<std::mutex> lk(w.mu);
    live = w.live;
  } else {
    live = w.live;
  }
  if (mask & ~live) {
    fault(c, "shuffle mask names lanes that do not exist or have exited");
    return bits;
  }
  const uint64_t my = me.shfl_seq++;
  const int p = (int)(my & 1);
  w.buf[p][me.lane] = bits;
  w.seq[p][me.lane] = my;
  warp_barrier(c, w, mask);
  if (c.fault.load()) return bits;
  if (src < 0 || src > 31 || !(mask >> src & 1u)) {
    fault(c, "shuffle reads lane " + std::to_string(src) + ", which is not in the mask");
    return bits;
  }
  if (w.seq[p][src] != my) {
    fault(c, "lanes of a warp reached different shuffles (divergent shuffle sequence)");
    return bits;
  }
  return w.buf[p][src];
}

void syncwarp(unsigned mask) { (void)shfl(mask, 0, lane_id()); }

int launch_impl(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*body)(void*), void* ctx) {
  const long long n = (long long)block.x * block.y * block.z;
  if (n < 1 || n > kMaxThreads || grid.x < 1 || grid.y < 1 || grid.z < 1) {
    g_last_fault = "invalid launch configuration";
    return cudaErrorInvalidConfiguration;
  }
  if (smem != 0) {
    g_last_fault = "dynamic shared memory is not emulated";
    return cudaErrorNotSupported;
  }
  const char* m = getenv("KDKERNELS_CUDA_EMULATE_MODE");
  const Mode mode = (m && strcmp(m, "threads") == 0) ? THREADS : FIBERS;
  std::lock_guard<std::mutex> lk(g_launch_mu);
  g_launches.fetch_add(1, std::memory_order_relaxed);
  g_cta.fault.store(false);
  g_cta.msg.clear();
  const int rc = mode == THREADS ? run_threads(grid, block, body, ctx) : run_fibers(grid, block, body, ctx);
  g_last_fault = rc ? g_cta.msg : std::string();
  g_cta.fault.store(false);
  return rc;
}

void set_last_error(int code) {
  if (code != 0) t_last_error = code;
}
const char* last_fault() { return g_last_fault.c_str(); }
Counters counters() {
  return Counters{g_launches.load(), g_ctas.load(), g_syncs.load(), g_shuffles.load()};
}

}  // namespace kd_emu

cudaError_t cudaGetLastError() {
  const int e = kd_emu::t_last_error;
  kd_emu::t_last_error = 0;
  return (cudaError_t)e;
}
cudaError_t cudaPeekAtLastError() { return (cudaError_t)kd_emu::t_last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated)";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}
