// Standalone host harness of the emulated CUDA kernels (no torch): runs kd::cuda_forward_rows /
// kd::cuda_backward_rows (csrc/cuda/kd_cuda.cu under cuda_emu.h) on a few shapes per divergence
// and dtype, and compares loss and gradient with the C++ CPU kernels (csrc/cpu/kd_cpu.cpp).
// Built for ThreadSanitizer by csrc/testing/run_tsan.sh (docs/cuda_emulation.md); run it with
// KDKERNELS_CUDA_EMULATE_MODE=threads so that every CUDA thread is an OS thread TSan watches.
// Exit status 0 when every case agrees.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <atomic>
#include <random>
#include <vector>

#include "cuda_emu.h"
#include "kd_cuda.h"
#include "kd_math.h"
#include "kd_rows.h"

using namespace kd;

namespace {

uint16_t to_bits(float x, int dtype) {
  return dtype == BF16 ? __float2bfloat16_rn(x).__x : __float2half_rn(x).__x;
}
float from_bits(uint16_t b, int dtype) {
  return dtype == BF16 ? __bfloat162float(__nv_bfloat16{b}) : __half2float(__half{b});
}
size_t esize(int dtype) { return dtype == F32 ? 4 : 2; }

struct Buffer {  // raw storage of `n` elements of `dtype`, plus room for offset views
  std::vector<unsigned char> bytes;
  int dtype;
  size_t n;
  Buffer(size_t count, int dt) : bytes(count * esize(dt) + 64), dtype(dt), n(count) {}
  void* at(size_t i) { return bytes.data() + 16 + i * esize(dtype); }  // 16: aligned base (vector)
  void set(size_t i, float x) {
    if (dtype == F32) memcpy(at(i), &x, 4);
    else { uint16_t b = to_bits(x, dtype); memcpy(at(i), &b, 2); }
  }
  float get(size_t i) {
    if (dtype == F32) { float x; memcpy(&x, at(i), 4); return x; }
    uint16_t b;
    memcpy(&b, at(i), 2);
    return from_bits(b, dtype);
  }
};

int failures = 0, cases = 0;

// One case: N rows of V columns; the student rows sit at row stride V + s_pad after an offset of
// s_off elements (s_pad = s_off = 0: contiguous), the teacher has Vt >= V columns.
void run_case(int div, int dtype, int64_t N, int64_t V, int64_t Vt, int s_off, int s_pad, float T,
              float hw, bool labels_on, bool all_ignored, unsigned seed) {
  ++cases;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 3.f);
  const int64_t s_stride = V + s_pad;
  Buffer s(s_off + N * s_stride + 8, dtype), t(N * Vt + 8, dtype);
  // -64 marks untouched padding
  for (size_t i = 0; i < s.n; ++i) s.set(i, -64.f);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < V; ++j) s.set(s_off + r * s_stride + j, nd(rng));
  for (int64_t i = 0; i < N * Vt; ++i) t.set(i, nd(rng));
  std::vector<int64_t> lab(N);
  for (int64_t r = 0; r < N; ++r) lab[r] = all_ignored || r == 1 ? -100 : (int64_t)(rng() % V);

  RowsArgs a;
  a.student = s.at(s_off);
  a.teacher = t.at(0);
  a.labels = labels_on ? lab.data() : nullptr;
  a.N = N;
  a.L = N;
  a.t_L = N;
  a.V = V;
  a.s_stride_b = N * s_stride;
  a.s_stride_l = s_stride;
  a.t_stride_b = N * Vt;
  a.t_stride_l = Vt;
  a.dtype = dtype;
  a.div = div;
  a.param = div == JSD ? 0.3f : 0.2f;
  a.temperature = T;
  a.soft_weight = 1.f;
  a.hard_weight = labels_on ? hw : 0.f;
  a.ignore_index = -100;

  std::vector<float> loss_e(N), stats_e(N * STATS_WIDTH), loss_c(N), stats_c(N * STATS_WIDTH);
  std::vector<float> gl(N);
  for (int64_t r = 0; r < N; ++r) gl[r] = 0.5f + 0.25f * (float)r;
  Buffer g_e(N * V + 8, dtype), g_c(N * V + 8, dtype);

  RowsArgs e = a;
  e.loss = loss_e.data();
  e.stats = stats_e.data();
  int rc = cuda_forward_rows(e, nullptr);
  e.grad_loss = gl.data();
  e.grad = g_e.at(0);
  if (!rc) rc = cuda_backward_rows(e, nullptr);
  RowsArgs c = a;
  c.loss = loss_c.data();
  c.stats = stats_c.data();
  cpu_forward_rows(c, 0, N);
  c.grad_loss = gl.data();
  c.grad = g_c.at(0);
  cpu_backward_rows(c, 0, N);

  double lmax = 0, gmax = 0, lerr = 0, gerr = 0;
  for (int64_t r = 0; r < N; ++r) {
    lmax = fmax(lmax, fabs(loss_c[r]));
    lerr = fmax(lerr, fabs((double)loss_e[r] - loss_c[r]));
  }
  for (int64_t i = 0; i < N * V; ++i) {
    gmax = fmax(gmax, fabs(g_c.get(i)));
    gerr = fmax(gerr, fabs((double)g_e.get(i) - g_c.get(i)));
  }
  const double gtol = dtype == BF16 ? 1e-2 : dtype == F16 ? 2e-3 : 2e-4;
  const bool ok = rc == 0 && lerr <= 2e-3 * lmax + 1e-4 && gerr <= gtol * gmax + 1e-6 &&
                  std::isfinite(lerr) && std::isfinite(gerr);
  if (!ok) {
    ++failures;
    printf("FAIL div=%s dtype=%d N=%lld V=%lld Vt=%lld off=%d pad=%d T=%g labels=%d rc=%d (%s): "
           "loss err %.3e (max %.3e) grad err %.3e (max %.3e)\n",
           kDivergenceNames[div], dtype, (long long)N, (long long)V, (long long)Vt, s_off, s_pad, T,
           (int)labels_on, rc, kd_emu::last_fault(), lerr, lmax, gerr, gmax);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && strcmp(argv[1], "quick") == 0;
  const int64_t Vs_full[] = {1, 7, 300, 1271};
  const int64_t Vs_quick[] = {7, 1271};
  for (int div = 0; div < NUM_DIVERGENCES; ++div)
    for (int dtype = F32; dtype <= F16; ++dtype) {
      unsigned seed = 1 + div * 10 + dtype;
      if (quick) {
        for (int64_t V : Vs_quick) run_case(div, dtype, 3, V, V, 0, 0, 2.f, 0.3f, true, false, seed++);
        run_case(div, dtype, 2, 1271, 1300, 1, 1, 0.5f, 0.3f, true, false, seed++);
        continue;
      }
      for (int64_t V : Vs_full) {
        run_case(div, dtype, 3, V, V, 0, 0, 2.f, 0.3f, true, false, seed++);
        run_case(div, dtype, 3, V, V + 3, 1, 1, 1.f, 0.5f, true, false, seed++);  // offset view, T = 1
      }
      run_case(div, dtype, 2, 301, 301, 0, 0, 0.7f, 0.f, false, false, seed++);   // soft only
      run_case(div, dtype, 2, 64, 64, 3, 2, 2.f, 0.4f, true, true, seed++);       // all ignored
    }
  const kd_emu::Counters k = kd_emu::counters();
  printf("%d cases, %d failed; %lld launches, %lld CTAs, %lld __syncthreads, %lld warp shuffles\n",
         cases, failures, k.launches, k.ctas, k.syncthreads, k.shuffles);
  return failures ? 1 : 0;
}
