// The one switch over divergence ids: the runtime id (kd_math.h DivId, the registry's integer)
// becomes a compile-time constant, and a functor is called with it, so kernels take the
// divergence as a template parameter (DESIGN.md §4: "its integer id is a compile-time mode").
//
//   auto fn = with_divergence(div, [](auto d) { return &fused_row<S, decltype(d)::value>; });
//
// Plain C++17, no torch and no CUDA headers (nvcc host code may use it too). An id outside
// [0, NUM_SOFTMAX_DIVERGENCES) gives the value-initialised result of the functor's type (nullptr
// for a function pointer, nothing for void); the bindings check the id before any kernel runs,
// and LOGIT_MSE (no softmax, its own kernels: kd_mse.h) is dispatched before this switch.
#pragma once

#include <type_traits>

#include "kd_math.h"

namespace kd {

template <int DIV>
using DivConst = std::integral_constant<int, DIV>;

template <class F>
inline decltype(auto) with_divergence(int div, F&& f) {
  using R = decltype(f(DivConst<FORWARD_KL>{}));
  static_assert(NUM_SOFTMAX_DIVERGENCES == 6 && NUM_DIVERGENCES == 7,
                "a new divergence needs its case here");
  switch (div) {
    case FORWARD_KL: return f(DivConst<FORWARD_KL>{});
    case REVERSE_KL: return f(DivConst<REVERSE_KL>{});
    case JSD: return f(DivConst<JSD>{});
    case SKEW_KL: return f(DivConst<SKEW_KL>{});
    case SKEW_REVERSE_KL: return f(DivConst<SKEW_REVERSE_KL>{});
    case TVD: return f(DivConst<TVD>{});
    default: return R();  // LOGIT_MSE included: its callers dispatch it first
  }
}

}  // namespace kd
