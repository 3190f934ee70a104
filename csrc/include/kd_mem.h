// Memory policy of the C++ CPU kernels (csrc/cpu, csrc/bindings.cpp): rows per thread task, and
// the preparation of a fresh gradient buffer (transparent huge pages, pages faulted in up front).
// Plain C++ (no torch): the caller passes its parallel-for.
//
// Environment: KDKERNELS_CPU_HUGEPAGES=0 turns off the huge-page advice and the page population;
// KDKERNELS_CPU_POPULATE=0 only the population.
#pragma once

#include <stdint.h>
#include <stdlib.h>

#include <algorithm>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kd {

// Rows per task: enough work per thread that small inputs do not pay for threading.
inline int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));
}

inline bool env_off(const char* name) {
  const char* v = getenv(name);
  return v && v[0] == '0';
}
inline bool use_huge_pages() { return !env_off("KDKERNELS_CPU_HUGEPAGES"); }

constexpr int64_t kHugePage = int64_t(1) << 21;

// Ask for transparent huge pages on a fresh output buffer before its first touch (Linux).
// Fresh multi-MB buffers come from new mmap pages whose first touch dominates the gradient
// pass; transparent huge pages cut the page faults 512-fold (PyTorch's THP_MEM_ALLOC_ENABLE
// does the same). Only the 2 MiB-aligned interior of a buffer of 8 MiB or more is advised;
// failure is harmless.
inline void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(kHugePage);
  if (bytes < int64_t(4 * huge)) return;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + uintptr_t(bytes)) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// Fault in (and zero) the pages of [ptr, ptr + bytes) before the kernel writes them. Faults taken
// inside the kernel's streaming loop cost more than faulting the same pages up front: the fused
// forward-KL op at N=1024, fp32, 2 threads, took 22 ms instead of 34 (V=32000) and 85 instead of
// 100-123 (V=128256) on the development VM (benchmarks/cpu_op_timing.py with and without
// KDKERNELS_CPU_POPULATE=0). The contents are left unspecified (zero or unchanged), so only call
// it on buffers the kernel then overwrites.
inline void populate_pages(void* ptr, int64_t bytes) {
#if defined(__linux__)
  // MADV_POPULATE_WRITE (Linux 5.14) maps and zeroes the pages without a user-space write; older
  // kernels refuse it (EINVAL), and then one store per 4 KiB page faults them in.
  constexpr int kPopulateWrite = 23;
  const uintptr_t page = 4096;
  if (bytes <= 0) return;
  uintptr_t begin = reinterpret_cast<uintptr_t>(ptr) & ~(page - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(ptr) + uintptr_t(bytes);
  if (madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateWrite) == 0) return;
  volatile char* c = static_cast<volatile char*>(ptr);
  for (int64_t off = 0; off < bytes; off += page) c[off] = 0;
#else
  (void)ptr;
  (void)bytes;
#endif
}

// A fresh gradient buffer that the kernel then overwrites completely: huge pages advised, then
// its pages faulted in by all threads, each a contiguous share of 2 MiB pages.
// parallel_for(n, f) runs f(begin, end) over [0, n) (at::parallel_for with grain 1, say).
template <class ParallelFor>
inline void prepare_gradient(void* ptr, int64_t bytes, ParallelFor&& parallel_for) {
  if (!use_huge_pages()) return;
  char* p = static_cast<char*>(ptr);
  advise_huge_pages(p, bytes);
  if (bytes < 4 * kHugePage || env_off("KDKERNELS_CPU_POPULATE")) return;
  const int64_t pages = (bytes + kHugePage - 1) / kHugePage;
  parallel_for(pages, [&](int64_t b, int64_t e) {
    populate_pages(p + b * kHugePage, std::min(e * kHugePage, bytes) - b * kHugePage);
  });
}

}  // namespace kd
