// The host side of the CUDA emulation's runtime (cuda_emu.cpp) that code outside the emulated
// kernels calls: the torch bindings include this, not cuda_emu.h, whose CUDA names (threadIdx,
// __shared__, ...) are macros that must stay out of a torch translation unit.
#pragma once

namespace kd_emu {
void set_last_error(int code);
const char* last_fault();  // message of the last failed launch ("" if none)
// Statistics for tests: launches, CTAs, barrier completions and shuffles since the process started.
struct Counters {
  long long launches, ctas, syncthreads, shuffles;
};
Counters counters();
}  // namespace kd_emu
