// Host emulation of the CUDA execution model, for running csrc/cuda/*.cu on the CPU (tests only).
//
// The same .cu file is compiled by the host C++ compiler with csrc/testing/include first on the
// include path (its cuda_runtime.h / cuda_bf16.h / cuda_fp16.h forward here) and KD_CUDA_EMULATE
// defined. What the kernels use is supplied:
//   threadIdx / blockIdx / blockDim / gridDim   thread-local, set by the emulator for each CUDA
//                                               thread (fiber or OS thread) it runs
//   __shared__                                  `static`: one copy shared by the CTA's threads;
//                                               CTAs run one after another, so per-CTA storage
//   __syncthreads()                             a real barrier over the CTA's live threads; every
//                                               thread must reach the same call site (checked)
//   __shfl_{xor,down,up,}_sync, __syncwarp      exchange through per-warp storage at a barrier of
//                                               the lanes in `mask` (checked: caller in mask,
//                                               source lane in mask, same mask, same sequence)
//   __device__ __global__ __host__ __forceinline__ __launch_bounds__
//   __nv_bfloat16, __half and their fp32 conversions (round to nearest even), uint4, dim3
//   cudaStream_t, cudaError_t, cudaGetLastError, cudaPeekAtLastError, cudaGetErrorString
//   KD_LAUNCH(kernel, grid, block, smem, stream, args...)   instead of kernel<<<...>>>(args...)
//   dynamic shared memory (`smem` bytes per CTA, kd_emu::dynamic_smem()), filled with 0xff bytes
//                                               at each CTA's start (a read before a write is NaN)
//   thread-block clusters (sm_90): KD_LAUNCH_CLUSTER(kernel, grid, block, cluster, smem, stream,
//                                               args...) runs each cluster's `cluster` CTAs (along
//                                               x) at the same time; kd_emu::cluster_rank / _size,
//                                               cluster_arrive / cluster_wait (barrier.cluster's
//                                               split arrive and wait: checked to alternate, every
//                                               live thread of the cluster counted, one call site
//                                               per phase) and map_shared_rank (distributed shared
//                                               memory: an address of this CTA's dynamic shared
//                                               memory in another CTA's; checked: in bounds, and
//                                               the other CTA has not exited). A kernel launched in
//                                               clusters keeps ALL its shared memory in the dynamic
//                                               buffer: `static` __shared__ would be one copy for
//                                               the cluster's CTAs that run together.
//   cudaGetDevice, cudaDeviceGetAttribute (compute capability KDKERNELS_CUDA_EMULATE_SM, default
//                                               90; shared memory per block opt-in 227 KiB),
//                                               cudaFuncSetAttribute (accepted, no effect)
// The threads of a CTA run as fibers on the calling OS thread (default; a missing barrier then
// shows up as a wrong answer) or, with KDKERNELS_CUDA_EMULATE_MODE=threads, as real OS threads
// (for ThreadSanitizer: each warp's shuffles and the CTA barrier synchronize through their own
// mutex, so TSan sees exactly the happens-before edges CUDA guarantees). A deadlock (threads
// waiting at different barriers), a shuffle with an inactive source lane or a mismatched mask
// fails the launch with cudaErrorLaunchFailure; kd_emu::last_fault() says why.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_emu_host.h"  // set_last_error, last_fault, counters

#define KD_CUDA_EMULATE_ACTIVE 1

// ---- qualifiers --------------------------------------------------------------------------------
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Shared memory: one static copy per kernel instantiation, shared by the CTA's threads (CTAs run
// one after another, under a process-wide launch lock).
#define __shared__ static

// ---- vector and index types --------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// ---- runtime API subset ----------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);

namespace kd_emu {
extern thread_local uint3 t_threadIdx, t_blockIdx;
extern thread_local dim3 t_blockDim, t_gridDim;

// Barrier of the CTA's live threads; `site` identifies the call site (all threads must agree).
void syncthreads(const char* file, int line);
// Exchange `bits` among the lanes of `mask`; returns the bits lane `src` contributed.
uint64_t shfl(unsigned mask, uint64_t bits, int src_lane);
void syncwarp(unsigned mask);
int lane_id();

// Run body(ctx) as every thread of every CTA of the grid, in clusters of `cluster` CTAs along x
// (1: no clusters); returns a cudaError_t code.
int launch_impl(dim3 grid, dim3 block, unsigned cluster, size_t smem, cudaStream_t stream, void (*body)(void*),
                void* ctx);

// This CTA's dynamic shared memory; thread-block clusters (see the header comment).
void* dynamic_smem();
unsigned cluster_rank();
unsigned cluster_size();
void cluster_arrive(const char* file, int line);
void cluster_wait(const char* file, int line);
void* map_shared_rank(const void* p, unsigned rank);

template <class... P, class... A>
void launch_cluster(void (*kernel)(P...), dim3 grid, dim3 block, unsigned cluster, size_t smem, cudaStream_t stream,
                    A&&... args) {
  // Kernel parameters are copied once, like CUDA's parameter buffer; every thread calls the
  // kernel with (by-value) copies of them.
  using Tuple = std::tuple<std::decay_t<P>...>;
  struct Ctx {
    void (*k)(P...);
    Tuple params;
  } ctx{kernel, Tuple(std::forward<A>(args)...)};
  auto body = [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->k, x->params);
  };
  set_last_error(launch_impl(grid, block, cluster, smem, stream, body, &ctx));
}
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  launch_cluster(kernel, grid, block, 1u, smem, stream, std::forward<A>(args)...);
}

template <class T>
inline T shfl_bits(unsigned mask, T var, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type > 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &var, sizeof(T));
  b = shfl(mask, b, src);
  T out;
  memcpy(&out, &b, sizeof(T));
  return out;
}
}  // namespace kd_emu

#define threadIdx (::kd_emu::t_threadIdx)
#define blockIdx (::kd_emu::t_blockIdx)
#define blockDim (::kd_emu::t_blockDim)
#define gridDim (::kd_emu::t_gridDim)
#define warpSize 32
#define __syncthreads() ::kd_emu::syncthreads(__FILE__, __LINE__)
#define KD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::kd_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define KD_LAUNCH_CLUSTER(kernel, grid, block, cluster, smem, stream, ...) \
  ::kd_emu::launch_cluster(kernel, grid, block, cluster, smem, stream, __VA_ARGS__)

// Warp primitives. `width` splits the warp into segments of `width` lanes, as in CUDA.
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
  const int lane = ::kd_emu::lane_id();
  int src = lane ^ laneMask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment: own value
  return ::kd_emu::shfl_bits(mask, var, src);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = ::kd_emu::lane_id();
  int src = lane + (int)delta;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return ::kd_emu::shfl_bits(mask, var, src);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = ::kd_emu::lane_id();
  int src = lane - (int)delta;
  if (src < 0 || (src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return ::kd_emu::shfl_bits(mask, var, src);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
  const int lane = ::kd_emu::lane_id();
  return ::kd_emu::shfl_bits(mask, var, (lane & ~(width - 1)) + (srcLane & (width - 1)));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::kd_emu::syncwarp(mask); }

// ---- bf16 and fp16 --------------------------------------------------------------------------------
struct __nv_bfloat16 {
  unsigned short __x;
};
struct __half {
  unsigned short __x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = (uint32_t)h.__x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep the sign, quiet
    h.__x = (unsigned short)((u >> 16) | 0x40u);
    return h;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (overflow rounds to inf)
  h.__x = (unsigned short)(u >> 16);
  return h;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

inline float __half2float(__half h) {
  const uint32_t x = h.__x;
  const uint32_t sign = (x & 0x8000u) << 16, e = (x >> 10) & 0x1fu, m = x & 0x3ffu;
  uint32_t u;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
    float f = (float)m * 5.9604644775390625e-8f;
    memcpy(&u, &f, 4);
    u |= sign;
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  __half h;
  if (a > 0x7f800000u) {
    h.__x = (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  } else if (a >= 0x477ff000u) {  // >= 65520: rounds to infinity (also inf itself)
    h.__x = (unsigned short)(sign | 0x7c00u);
  } else if (a < 0x38800000u) {  // below 2^-14: subnormal half, round(|f| * 2^24) to even
    float af;
    memcpy(&af, &a, 4);
    h.__x = (unsigned short)(sign | (uint32_t)nearbyintf(af * 16777216.0f));
  } else {  // normal: rebias the exponent, round the 13 dropped bits to nearest even
    const uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // 0xc8000000 = (15 - 127) << 23
    h.__x = (unsigned short)(sign | (r >> 13));
  }
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }

// Intrinsics that kd_math.h uses only under __CUDA_ARCH__ (never defined here), for other code.
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  memcpy(&i, &f, 4);
  return i;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
