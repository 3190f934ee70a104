// Runtime of the host CUDA emulation (cuda_emu.h): launch, CTA and cluster barriers, warp
// shuffles, dynamic and distributed shared memory, and the two ways of running the threads of a
// cluster's CTAs (fibers on the calling thread, or real OS threads). A launch without clusters is
// one of clusters of one CTA.
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
constexpr int kMaxCluster = 16;                   // non-portable cluster size limit (sm_90)
constexpr size_t kMaxSmem = 227 * 1024;           // dynamic shared memory per CTA, opt-in (sm_90)

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

// A barrier of the live (not exited) threads of a CTA (__syncthreads) or of a cluster: the
// threads of a phase all arrive at one call site; the last arrival, or an exit that leaves every
// live thread arrived, releases it (barrier_arrive / barrier_wait / barrier_leave below).
struct Barrier {
  std::mutex mu;  // threads mode
  std::condition_variable cv;
  int live = 0;   // threads that have not exited
  int arrived = 0;
  uint64_t gen = 0;  // phases released
  const char* file = nullptr;
  int line = 0;
  const char* divergent = "";  // the fault's text when threads arrive at two call sites
  void reset(int n) {
    live = n;
    arrived = 0;
    gen = 0;
    file = nullptr;
    line = 0;
  }
};

struct Cta {
  int n = 0;     // threads per CTA
  Barrier bar{};  // __syncthreads
  Warp warps[kMaxWarps];
  unsigned char* smem = nullptr;  // dynamic shared memory
};

// The cluster being run (a launch without clusters: clusters of one CTA) and its barrier.
struct Cluster {
  Mode mode = FIBERS;
  int size = 1;        // CTAs
  size_t smem = 0;     // dynamic shared memory per CTA, bytes
  Barrier bar{};       // the cluster barrier, of all the cluster's threads
  long long progress = 0;  // fibers mode only: arrivals, releases, exits (deadlock detection)
  std::atomic<bool> fault{false};
  std::mutex msg_mu;
  std::string msg;
};

struct ThreadCtx {
  int tid = 0, lane = 0, warp = 0, rank = 0;
  uint3 bidx = {0, 0, 0};
  uint64_t shfl_seq = 0;
  bool cl_arrived = false;  // arrived at the cluster barrier, not yet waited
  uint64_t cl_gen = 0;      // the cluster barrier's phase it arrived in
};

std::mutex g_launch_mu;  // one launch at a time (static __shared__ storage, the fiber pool)
Cta g_ctas[kMaxCluster];
Cluster g_cl;
std::vector<unsigned char> g_smem;  // the cluster's dynamic shared memory, CTA after CTA
thread_local ThreadCtx* t_self = nullptr;
thread_local int t_last_error = 0;
std::string g_last_fault;
std::atomic<long long> g_launches{0}, g_ctas_run{0}, g_syncs{0}, g_shuffles{0};

Cta& cur_cta() { return g_ctas[t_self ? t_self->rank : 0]; }
bool faulted() { return g_cl.fault.load(); }

void fault(const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(g_cl.msg_mu);
    if (g_cl.msg.empty()) g_cl.msg = why;
  }
  g_cl.fault.store(true);
  if (g_cl.mode == THREADS) {  // wake every waiter; each re-checks the fault flag. No locks taken:
    // the caller may hold one (a waiter that misses this wakes at its 30 s deadline and sees it)
    g_cl.bar.cv.notify_all();
    for (int r = 0; r < g_cl.size; ++r) {
      Cta& c = g_ctas[r];
      c.bar.cv.notify_all();
      for (int w = 0; w < (c.n + 31) / 32; ++w) c.warps[w].cv.notify_all();
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

void on_exit();

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
  on_exit();
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
  t_blockIdx = f.ctx.bidx;
#if defined(__x86_64__)
  kd_emu_switch(&g_sched_sp, f.sp);
#else
  swapcontext(&g_sched_uc, &f.uc);
#endif
}

// ---- CTA and cluster state ------------------------------------------------------------------------
// Dynamic shared memory per CTA, rounded up to 16 bytes (the CTAs' buffers are 16-byte aligned).
size_t smem_stride(size_t smem) { return (smem + 15) & ~(size_t)15; }

void reset_cta(Cta& c, int n, unsigned char* smem, size_t bytes) {
  c.n = n;
  c.bar.reset(n);
  c.bar.divergent = "divergent __syncthreads: threads wait at ";
  c.smem = smem;
  if (bytes) memset(smem, 0xff, bytes);  // uninitialized, as on a GPU: unwritten floats read NaN
  for (int w = 0; w < (n + 31) / 32; ++w) {
    Warp& wp = c.warps[w];
    wp.arrived = 0;
    wp.gen = 0;
    wp.mask = 0;
    const int lanes = n - 32 * w >= 32 ? 32 : n - 32 * w;
    wp.live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
}

// Every CTA of the cluster, starting over (between clusters).
void reset_cluster(Mode mode, int size, int n, size_t smem) {
  g_cl.mode = mode;
  g_cl.size = size;
  g_cl.smem = smem;
  g_cl.bar.reset(size * n);
  g_cl.bar.divergent = "divergent cluster barrier: threads arrive at ";
  g_cl.progress = 0;
  const size_t stride = smem_stride(smem);
  if (g_smem.size() < stride * size + 16) g_smem.resize(stride * size + 16);
  unsigned char* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(g_smem.data()) + 15) & ~(uintptr_t)15);
  for (int r = 0; r < size; ++r) reset_cta(g_ctas[r], n, base + r * stride, smem);
}

std::string describe_waiters() {
  std::string s;
  const Barrier& cb = g_cl.bar;
  if (cb.arrived)
    s += std::to_string(cb.arrived) + " of " + std::to_string(cb.live) +
         " live threads of the cluster wait at the cluster barrier (" + where(cb.file, cb.line) + "); ";
  for (int r = 0; r < g_cl.size; ++r) {
    Cta& c = g_ctas[r];
    if (g_cl.size > 1) s += "CTA " + std::to_string(r) + ": ";
    s += std::to_string(c.bar.arrived) + " of " + std::to_string(c.bar.live) + " live threads wait at __syncthreads";
    if (c.bar.arrived) s += " (" + where(c.bar.file, c.bar.line) + ")";
    for (int w = 0; w < (c.n + 31) / 32; ++w)
      if (c.warps[w].arrived)
        s += "; warp " + std::to_string(w) + ": " + std::to_string(c.warps[w].arrived) +
             " lanes wait in a shuffle";
    if (r + 1 < g_cl.size) s += "; ";
  }
  return s;
}

// Count an arrival at `b` (threads mode: the caller holds b.mu); true when it released the phase.
bool arrive_locked(Barrier& b, const char* file, int line) {
  if (b.arrived == 0) {
    b.file = file;
    b.line = line;
  } else if (b.line != line || strcmp(b.file, file) != 0) {
    fault(b.divergent + where(b.file, b.line) + " and at " + where(file, line));
  }
  if (g_cl.mode == FIBERS) ++g_cl.progress;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
    g_syncs.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  return false;
}

bool warp_arrive(Warp& w, unsigned mask) {
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    fault("warp shuffles with different masks at the same time");
  }
  if (g_cl.mode == FIBERS) ++g_cl.progress;  // threads mode: the warps' barriers hold different locks
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
void thread_wait(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, Pred done) {
  if (!cv.wait_for(lk, kDeadlock, [&] { return done() || faulted(); })) {
    lk.unlock();
    fault("deadlock: no barrier progress for 30 s (" + describe_waiters() + ")");
    lk.lock();
  }
}

// Fibers: give way until `done`; after a fault, forever (the scheduler abandons the cluster).
template <class Pred>
void fiber_wait(Pred done) {
  while (!done() && !faulted()) yield();
  while (faulted()) yield();
}

// Arrive at `b`; *phase: the phase arrived in (barrier_wait waits for its release).
void barrier_arrive(Barrier& b, const char* file, int line, uint64_t* phase) {
  std::unique_lock<std::mutex> lk(b.mu, std::defer_lock);
  if (g_cl.mode == THREADS) lk.lock();
  *phase = b.gen;
  if (arrive_locked(b, file, line) && g_cl.mode == THREADS) {
    lk.unlock();
    b.cv.notify_all();
  }
}

void barrier_wait(Barrier& b, uint64_t phase) {
  if (g_cl.mode == THREADS) {
    std::unique_lock<std::mutex> lk(b.mu);
    thread_wait(b.cv, lk, [&] { return b.gen != phase; });
  } else {
    fiber_wait([&] { return b.gen != phase; });
  }
}

// A thread of `b` exits; a phase whose other live threads have all arrived is released.
void barrier_leave(Barrier& b) {
  std::unique_lock<std::mutex> lk(b.mu, std::defer_lock);
  if (g_cl.mode == THREADS) lk.lock();
  --b.live;
  if (g_cl.mode == FIBERS) ++g_cl.progress;
  if (b.arrived && b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
    g_syncs.fetch_add(1, std::memory_order_relaxed);
    if (g_cl.mode == THREADS) {
      lk.unlock();
      b.cv.notify_all();
    }
  }
}

void warp_barrier(Warp& w, unsigned mask) {
  if (g_cl.mode == THREADS) {
    std::unique_lock<std::mutex> lk(w.mu);
    if (warp_arrive(w, mask)) {
      lk.unlock();
      w.cv.notify_all();
      return;
    }
    const uint64_t g = w.gen;
    thread_wait(w.cv, lk, [&] { return w.gen != g; });
  } else {
    if (warp_arrive(w, mask)) return;
    const uint64_t g = w.gen;
    fiber_wait([&] { return w.gen != g; });
  }
}

// A thread exits: it no longer counts at its CTA's barrier, its warp's shuffles, nor the cluster
// barrier (a barrier its exit completes is released).
void on_exit() {
  ThreadCtx& me = *t_self;
  Cta& c = cur_cta();
  Warp& w = c.warps[me.warp];
  const bool threads = g_cl.mode == THREADS;
  {
    std::unique_lock<std::mutex> lk(w.mu, std::defer_lock);
    if (threads) lk.lock();
    w.live &= ~(1u << me.lane);
    if (w.arrived && (w.mask >> me.lane & 1u)) {
      if (threads) lk.unlock();
      fault("a lane exited while its warp waits for it in a shuffle");
    }
  }
  barrier_leave(c.bar);
  barrier_leave(g_cl.bar);
}

// ---- the two executors -----------------------------------------------------------------------------
// Clusters of `size` CTAs along x; the grid's x extent is a multiple of it (checked by launch_impl).
int run_fibers(dim3 grid, dim3 block, int size, size_t smem, void (*body)(void*), void* ctx) {
  const int n = (int)(block.x * block.y * block.z);
  const int nf = n * size;
  if ((int)g_fibers.size() < nf) g_fibers.resize(nf);
  g_body = body;
  g_body_ctx = ctx;
  t_blockDim = block;
  t_gridDim = grid;
  ThreadCtx* saved_self = t_self;
  const uint3 saved_idx = t_threadIdx, saved_bidx = t_blockIdx;
  int rc = 0;
  for (unsigned bz = 0; bz < grid.z && !rc; ++bz)
    for (unsigned by = 0; by < grid.y && !rc; ++by)
      for (unsigned cx = 0; cx < grid.x / size && !rc; ++cx) {
        reset_cluster(FIBERS, size, n, smem);
        for (int r = 0; r < size; ++r)
          for (int i = 0; i < n; ++i) {
            Fiber& f = g_fibers[r * n + i];
            fiber_init(f);
            f.ctx = ThreadCtx{};
            f.ctx.tid = i;
            f.ctx.lane = i % 32;
            f.ctx.warp = i / 32;
            f.ctx.rank = r;
            f.ctx.bidx = uint3{cx * size + r, by, bz};
          }
        // Warp-greedy schedule: one warp at a time runs as far as it can (its lanes are resumed
        // until none of them makes progress, i.e. all wait at a barrier or have exited) before
        // the next warp runs, so a warp races ahead of the others as far as the barriers allow: a
        // missing __syncthreads lets it overwrite shared memory another warp has not read yet, or
        // read what another has not written (and a missing cluster barrier the same across the
        // CTAs, which are taken one after another). Even clusters take the CTAs and their warps
        // in ascending order, odd ones in descending order (both directions of a race).
        const int nw = (n + 31) / 32;
        const bool reverse = ((cx + by + bz) & 1u) != 0;
        int remaining = nf;
        while (remaining > 0 && !faulted()) {
          const long long p0 = g_cl.progress;
          for (int ri = 0; ri < size && !faulted(); ++ri) {
            const int r = reverse ? size - 1 - ri : ri;
            for (int wi = 0; wi < nw && !faulted(); ++wi) {
              const int w = reverse ? nw - 1 - wi : wi;
              const int lo = r * n + 32 * w, hi = r * n + (32 * w + 32 < n ? 32 * w + 32 : n);
              long long pw;
              do {
                pw = g_cl.progress;
                for (int i = lo; i < hi && !faulted(); ++i) {
                  Fiber& f = g_fibers[i];
                  if (f.done) continue;
                  resume(f, block);
                  if (f.done) --remaining;
                }
              } while (g_cl.progress != pw && !faulted());
            }
          }
          if (remaining > 0 && g_cl.progress == p0 && !faulted()) fault("deadlock: " + describe_waiters());
        }
        g_ctas_run.fetch_add(size, std::memory_order_relaxed);
        if (faulted()) rc = cudaErrorLaunchFailure;
      }
  t_self = saved_self;
  t_threadIdx = saved_idx;
  t_blockIdx = saved_bidx;
  return rc;
}

struct EndBarrier {  // all OS threads of the launch, between clusters
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

int run_threads(dim3 grid, dim3 block, int size, size_t smem, void (*body)(void*), void* ctx) {
  const int n = (int)(block.x * block.y * block.z);
  reset_cluster(THREADS, size, n, smem);
  EndBarrier end;
  end.n = n * size;
  std::atomic<int> rc{0};
  auto worker = [&](int gtid) {
    ThreadCtx me;
    me.tid = gtid % n;
    me.lane = me.tid % 32;
    me.warp = me.tid / 32;
    me.rank = gtid / n;
    t_self = &me;
    t_blockDim = block;
    t_gridDim = grid;
    set_thread_index(me.tid, block);
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned cx = 0; cx < grid.x / size; ++cx) {
          t_blockIdx = uint3{cx * size + me.rank, by, bz};
          me.shfl_seq = 0;
          me.cl_arrived = false;
          const bool skip = rc.load() != 0;
          if (!skip) {
            body(ctx);
            on_exit();
          }
          end.wait([&] {  // the last thread of the cluster: record the result, reset for the next
            g_ctas_run.fetch_add(size, std::memory_order_relaxed);
            if (faulted()) rc.store(cudaErrorLaunchFailure);
            reset_cluster(THREADS, size, n, smem);
          });
        }
  };
  std::vector<std::thread> threads;
  threads.reserve(n * size);
  for (int gtid = 0; gtid < n * size; ++gtid) threads.emplace_back(worker, gtid);
  for (auto& t : threads) t.join();
  return rc.load();
}

}  // namespace

// ---- device-side API ---------------------------------------------------------------------------
int lane_id() { return t_self ? t_self->lane : 0; }

void syncthreads(const char* file, int line) {
  Barrier& b = cur_cta().bar;
  uint64_t phase;
  barrier_arrive(b, file, line, &phase);
  barrier_wait(b, phase);
}

uint64_t shfl(unsigned mask, uint64_t bits, int src) {
  Cta& c = cur_cta();
  ThreadCtx& me = *t_self;
  Warp& w = c.warps[me.warp];
  if (!(mask >> me.lane & 1u)) {
    fault("shuffle by lane " + std::to_string(me.lane) + " not in its mask");
    return bits;
  }
  unsigned live;
  if (g_cl.mode == THREADS) {
    std::lock_guard<std::mutex> lk(w.mu);
    live = w.live;
  } else {
    live = w.live;
  }
  if (mask & ~live) {
    fault("shuffle mask names lanes that do not exist or have exited");
    return bits;
  }
  const uint64_t my = me.shfl_seq++;
  const int p = (int)(my & 1);
  w.buf[p][me.lane] = bits;
  w.seq[p][me.lane] = my;
  warp_barrier(w, mask);
  if (faulted()) return bits;
  if (src < 0 || src > 31 || !(mask >> src & 1u)) {
    fault("shuffle reads lane " + std::to_string(src) + ", which is not in the mask");
    return bits;
  }
  if (w.seq[p][src] != my) {
    fault("lanes of a warp reached different shuffles (divergent shuffle sequence)");
    return bits;
  }
  return w.buf[p][src];
}

void syncwarp(unsigned mask) { (void)shfl(mask, 0, lane_id()); }

void* dynamic_smem() { return cur_cta().smem; }
unsigned cluster_rank() { return t_self ? (unsigned)t_self->rank : 0u; }
unsigned cluster_size() { return (unsigned)g_cl.size; }

void cluster_arrive(const char* file, int line) {
  ThreadCtx& me = *t_self;
  if (me.cl_arrived) {
    fault("cluster barrier: arrive twice without a wait (" + where(file, line) + ")");
    return;
  }
  me.cl_arrived = true;
  barrier_arrive(g_cl.bar, file, line, &me.cl_gen);
}

void cluster_wait(const char* file, int line) {
  ThreadCtx& me = *t_self;
  if (!me.cl_arrived) {
    fault("cluster barrier: a wait without an arrive (" + where(file, line) + ")");
    return;
  }
  me.cl_arrived = false;
  barrier_wait(g_cl.bar, me.cl_gen);
}

void* map_shared_rank(const void* p, unsigned rank) {
  Cta& c = cur_cta();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(c.smem);
  if (rank >= (unsigned)g_cl.size) {
    fault("map_shared_rank: rank " + std::to_string(rank) + " outside the cluster of " +
          std::to_string(g_cl.size));
    return const_cast<void*>(p);
  }
  if (!c.smem || a < base || a >= base + g_cl.smem) {
    fault("map_shared_rank: the address is not in this CTA's dynamic shared memory");
    return const_cast<void*>(p);
  }
  Cta& o = g_ctas[rank];
  bool gone;
  if (g_cl.mode == THREADS) {
    std::lock_guard<std::mutex> lk(o.bar.mu);
    gone = o.bar.live == 0;
  } else {
    gone = o.bar.live == 0;
  }
  if (gone) fault("distributed shared memory of CTA " + std::to_string(rank) + " of the cluster, which has exited");
  return o.smem + (a - base);
}

int launch_impl(dim3 grid, dim3 block, unsigned cluster, size_t smem, cudaStream_t, void (*body)(void*),
                void* ctx) {
  const long long n = (long long)block.x * block.y * block.z;
  if (n < 1 || n > kMaxThreads || grid.x < 1 || grid.y < 1 || grid.z < 1) {
    g_last_fault = "invalid launch configuration";
    return cudaErrorInvalidConfiguration;
  }
  if (cluster < 1 || cluster > (unsigned)kMaxCluster || grid.x % cluster != 0) {
    g_last_fault = "invalid cluster dimension (1 to 16 CTAs, dividing the grid's x extent)";
    return cudaErrorInvalidConfiguration;
  }
  if (smem > kMaxSmem) {
    g_last_fault = "more dynamic shared memory than a CTA can have";
    return cudaErrorInvalidValue;
  }
  const char* m = getenv("KDKERNELS_CUDA_EMULATE_MODE");
  const Mode mode = (m && strcmp(m, "threads") == 0) ? THREADS : FIBERS;
  std::lock_guard<std::mutex> lk(g_launch_mu);
  g_launches.fetch_add(1, std::memory_order_relaxed);
  g_cl.fault.store(false);
  g_cl.msg.clear();
  const int rc = mode == THREADS ? run_threads(grid, block, (int)cluster, smem, body, ctx)
                                 : run_fibers(grid, block, (int)cluster, smem, body, ctx);
  g_last_fault = rc ? g_cl.msg : std::string();
  g_cl.fault.store(false);
  return rc;
}

void set_last_error(int code) {
  if (code != 0) t_last_error = code;
}
const char* last_fault() { return g_last_fault.c_str(); }
Counters counters() {
  return Counters{g_launches.load(), g_ctas_run.load(), g_syncs.load(), g_shuffles.load()};
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
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// The emulated device: compute capability KDKERNELS_CUDA_EMULATE_SM (e.g. 80, 90; default 90).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const char* e = getenv("KDKERNELS_CUDA_EMULATE_SM");
  const int sm = e && *e ? atoi(e) : 90;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = sm / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = sm % 10; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)kd_emu::kMaxSmem; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
