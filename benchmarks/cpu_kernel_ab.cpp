// A/B timing of the C++ CPU fused kernel (cpu_forward_grad_rows) alone, one thread, without
// torch: N = 128 rows, random logits (std 3), T = 2, median of 7 calls per divergence.
// Build two versions and alternate them (see benchmarks/results/cpu-AMD-EPYC-2026-12-02/):
//   g++ -O3 -fopenmp -fno-trapping-math -std=c++17 -mavx2 -mfma -mf16c [-mavx512f -mavx512bw
//       -mavx512vl -mavx512dq] -Icsrc/include benchmarks/cpu_kernel_ab.cpp csrc/cpu/kd_cpu.cpp
//       csrc/cpu/mse_cpu.cpp -o ab
//   OMP_NUM_THREADS=1 ./ab V DTYPE        (DTYPE 0 = fp32, 1 = bf16; prints ns per element)
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include <algorithm>
#include "kd_rows.h"
#include "kd_dtype.h"
using namespace kd;
int main(int argc, char** argv) {
  int64_t N = 128, V = atoi(argv[1]); int dt = atoi(argv[2]);  // 0 f32, 1 bf16
  std::mt19937 g(1); std::normal_distribution<float> nd(0, 3);
  std::vector<float> sf(N * V), tf(N * V);
  for (auto& x : sf) x = nd(g); for (auto& x : tf) x = nd(g);
  std::vector<uint16_t> sb(N * V), tb(N * V);
  for (int64_t i = 0; i < N * V; ++i) { uint32_t u, w; memcpy(&u, &sf[i], 4); memcpy(&w, &tf[i], 4); sb[i] = u >> 16; tb[i] = w >> 16; }
  std::vector<float> loss(N), stats(N * 7), gl(N, 1.f), grad(N * V);
  const char* names[] = {"fkl", "rkl", "jsd", "skew", "skewr", "tvd"};
  float params[] = {0, 0, 0.5f, 0.1f, 0.1f, 0};
  for (int div = 0; div < 6; ++div) {
    RowsArgs a; a.student = dt ? (void*)sb.data() : (void*)sf.data(); a.teacher = dt ? (void*)tb.data() : (void*)tf.data();
    a.N = N; a.L = N; a.V = V; a.t_L = N; a.s_stride_l = V; a.t_stride_l = V; a.s_stride_b = N * V; a.t_stride_b = N * V;
    a.dtype = dt ? BF16 : F32; a.div = div; a.param = params[div]; a.temperature = 2.f;
    a.loss = loss.data(); a.stats = stats.data(); a.grad_loss = gl.data(); a.grad = grad.data();
    std::vector<double> ts;
    for (int rep = 0; rep < 7; ++rep) {
      std::atomic<int64_t> next{0};
      auto t0 = std::chrono::steady_clock::now();
      cpu_forward_grad_rows(a, next, 4);
      ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    printf("%s %.2f ns/elem (loss0 %.6f)\n", names[div], ts[3] * 1e6 / (N * V), loss[0]);
  }
}
