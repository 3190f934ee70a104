"""The online forward / reverse KL state of csrc/include/kd_math.h (OnlineKL: absorb, merge,
divergence) against the float64 oracle.

The C++ CPU kernel runs only OnlineKL::absorb (one running state, block sums centred on the raised
maxima); the CUDA kernels combine the partial states of threads, warps and CTAs (since 2026-12-03
as the row's maxima, every state absorbed onto them, then plain sums: mode 4 below; before, by
merges: modes 0 and 3). So the merge is
tested here through a small C++ harness compiled from kd_math.h on this machine: it splits a row
the way the CUDA forward kernel does (thread i takes chunks i, i + threads, ...; lanes past V read
-inf), absorbs chunk by chunk, then merges in the kernel's order (xor butterfly in warps of 32,
then the warps in order) or in a left or right fold. Per chunk it re-centres the state and adds the
terms into it (the CUDA forward kernel's order) or absorbs the chunk's own sums (the CPU kernel's,
mode 3). Host build: log_ratio is logf there (the CUDA build takes log1pf near 1, kd_math.h).

The second half runs the same math through the C++ CPU op (forward only, and forward with the
gradient) on rows whose running maximum moves from block to block at |logits| ~ 1e4, T = 0.05 and
T = 50: the fuzz regressions (test_regressions.py) cover one-hot and T = 50 rows only within one
block (V = 2, V = 177), test_cpu_fused.py's late-maximum case only at |logits| ~ 30 and T = 1.5.
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import kdkernels as kd
from kdkernels.backends import compiled as cpp

import oracle
from conftest import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
NEG_INF = float("-inf")

HARNESS = r"""
#include <stdint.h>
#include <vector>
#include "kd_math.h"
using namespace kd;

template <int DIV>
static void run(const float* a, const float* b, int64_t V, int threads, int chunk, int mode,
                float* out) {
  std::vector<OnlineKL<DIV>> st(threads);
  for (int i = 0; i < threads; ++i) {  // per thread, as forward_kernel in kd_cuda.cu
    OnlineKL<DIV>& on = st[i];
    on.init();
    for (int64_t j = (int64_t)i * chunk; j < V; j += (int64_t)threads * chunk) {
      float bma = kNegInf, bmb = kNegInf;
      for (int k = 0; k < chunk; ++k) {
        bma = fmaxf(bma, j + k < V ? a[j + k] : kNegInf);
        bmb = fmaxf(bmb, j + k < V ? b[j + k] : kNegInf);
      }
      const float nma = raise_max(on.ma, bma), nmb = raise_max(on.mb, bmb);
      const float offa = safe_max(nma), offb = safe_max(nmb);
      if (mode == 3) {  // the CPU kernel's order: the block's own sums, absorbed
        float za = 0.f, zb = 0.f, acc = 0.f;
        for (int k = 0; k < chunk; ++k) {
          const float av = j + k < V ? a[j + k] : kNegInf, bv = j + k < V ? b[j + k] : kNegInf;
          const float ea = exp_fast(av - offa), eb = exp_fast(bv - offb);
          za += ea;
          zb += eb;
          acc += online_kl_term<DIV>(av, bv, offa, offb, ea, eb);
        }
        on.absorb(nma, nmb, za, zb, acc);
        continue;
      }
      on.absorb(nma, nmb, 0.f, 0.f, 0.f);  // the CUDA kernel's order: re-centre, then add
      for (int k = 0; k < chunk; ++k) {
        const float av = j + k < V ? a[j + k] : kNegInf, bv = j + k < V ? b[j + k] : kNegInf;
        const float ea = exp_fast(av - offa), eb = exp_fast(bv - offb);
        on.za += ea;
        on.zb += eb;
        on.acc += online_kl_term<DIV>(av, bv, offa, offb, ea, eb);
      }
    }
  }
  OnlineKL<DIV> r;
  if (mode == 0 || mode == 3) {  // warp_merge (xor butterfly) then block_merge (warps in order)
    for (int off = 16; off > 0; off >>= 1) {
      std::vector<OnlineKL<DIV>> nxt(st);
      for (int i = 0; i < threads; ++i) nxt[i].merge(st[i ^ off]);
      st.swap(nxt);
    }
    r = st[0];
    for (int w = 32; w < threads; w += 32) r.merge(st[w]);
  } else if (mode == 1) {  // left fold from an empty state
    r.init();
    for (int i = 0; i < threads; ++i) r.merge(st[i]);
  } else if (mode == 4) {  // the CUDA kernels' merge_row_state: maxima reduced, every state
    // re-centred on them (absorb), then the sums added (xor butterfly in warps, warps in order)
    float ma = kNegInf, mb = kNegInf;
    for (int i = 0; i < threads; ++i) {
      ma = fmaxf(ma, st[i].ma);
      mb = fmaxf(mb, st[i].mb);
    }
    for (int i = 0; i < threads; ++i) st[i].absorb(ma, mb, 0.f, 0.f, 0.f);
    for (int off = 16; off > 0; off >>= 1) {
      std::vector<OnlineKL<DIV>> nxt(st);
      for (int i = 0; i < threads; ++i) {
        nxt[i].za = st[i].za + st[i ^ off].za;
        nxt[i].zb = st[i].zb + st[i ^ off].zb;
        nxt[i].acc = st[i].acc + st[i ^ off].acc;
      }
      st.swap(nxt);
    }
    r = st[0];
    for (int w = 32; w < threads; w += 32) {
      r.za += st[w].za;
      r.zb += st[w].zb;
      r.acc += st[w].acc;
    }
  } else {  // right fold
    r = st[threads - 1];
    for (int i = threads - 2; i >= 0; --i) {
      OnlineKL<DIV> x = st[i];
      x.merge(r);
      r = x;
    }
  }
  out[0] = r.divergence();
  out[1] = r.ma;
  out[2] = r.za;
  out[3] = r.mb;
  out[4] = r.zb;
}

extern "C" void kd_test_online_kl(int div, const float* a, const float* b, int64_t V,
                                  int threads, int chunk, int mode, float* out) {
  if (div == FORWARD_KL) run<FORWARD_KL>(a, b, V, threads, chunk, mode, out);
  else run<REVERSE_KL>(a, b, V, threads, chunk, mode, out);
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler on PATH")
    d = tmp_path_factory.mktemp("kd_math_merge")
    src, lib = d / "harness.cpp", d / "harness.so"
    src.write_text(HARNESS)
    proc = subprocess.run([CXX, "-O2", "-std=c++17", "-shared", "-fPIC",
                           "-I", os.path.join(ROOT, "csrc", "include"), str(src), "-o", str(lib)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fn = ctypes.CDLL(str(lib)).kd_test_online_kl
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fn.restype = None

    def run(div, a, b, threads, chunk, mode):
        a, b = a.float().contiguous(), b.float().contiguous()
        out = torch.empty(5, dtype=torch.float32)
        fn({"forward_kl": 0, "reverse_kl": 1}[div], a.data_ptr(), b.data_ptr(), a.numel(),
           threads, chunk, mode, out.data_ptr())
        return out

    return run


def _row(kind, V, T, g):
    """(t, s) logits of one row, fp32."""
    n = lambda scale: torch.randn(V, generator=g, dtype=torch.float64) * scale
    up = torch.linspace(0.0, 1.0, V, dtype=torch.float64)
    if kind == "ramp_1e4":  # |logits| ~ 1e4, the maximum rises in every chunk
        t, s = n(3.0) + 2e4 * up - 1e4, n(3.0) + 2e4 * up - 1e4
    elif kind == "ramp_moderate":  # scaled slope 30 over the row: a spread, moving maximum
        t, s = n(1.0) + 30.0 * T * up, n(1.0) + 30.0 * T * up.flip(0) * 0.5 + 20.0 * T * up
    elif kind == "onehot_end":  # one-hot teacher at the last column, student at ±1e4
        t = torch.full((V,), -1e4, dtype=torch.float64)
        t[-1] = 1e4
        s = n(1e4)
    elif kind == "onehot_student_end":
        s = torch.full((V,), -1e4, dtype=torch.float64)
        s[-1] = 1e4
        t = n(1e4)
    elif kind == "descending_1e4":
        t, s = n(3.0) - 2e4 * up + 1e4, n(30.0) - 2e4 * up + 1e4
    elif kind == "randn_1e4":
        t, s = n(1e4), n(1e4)
    elif kind == "neg_inf_prefix":  # shared -inf columns: whole threads and chunks stay empty
        t, s = n(3.0) + 10 * up, n(3.0)
        t[: V // 2] = NEG_INF
        s[: V // 2] = NEG_INF
    else:
        raise ValueError(kind)
    return t.float(), s.float()


KINDS = ["ramp_1e4", "ramp_moderate", "onehot_end", "onehot_student_end", "descending_1e4",
         "randn_1e4", "neg_inf_prefix"]
# (threads, chunk): the CUDA kernel's fp32 and 16-bit splits, and a finer one
SPLITS = [(256, 4), (256, 8), (64, 1)]


def _expected(div, t, s, T):
    """float64 oracle and plain fp32 PyTorch for D (no T^2) of one row, and the size of the two
    terms that D = acc / z + log(z' / z) cancels: |acc / z| in float64."""
    t2, s2 = t.view(1, -1), s.view(1, -1)
    e = oracle.rows(s2.double(), t2.double(), div, temperature=T)[0] / (T * T)
    p = oracle.rows(s2, t2, div, temperature=T, dtype=torch.float32)[0] / (T * T)
    a, b = t.double() / T, s.double() / T
    ca, cb = a - a.max(), b - b.max()
    if div == "forward_kl":
        w, x = torch.softmax(a, 0), ca - cb
    else:
        w, x = torch.softmax(b, 0), cb - ca
    centred = float(torch.where(w > 0, w * x, 0.0).sum())
    return e, p, max(abs(float(e)), abs(centred))


# Rounding allowance relative to the cancelling terms: the CUDA kernel's merge order (butterfly,
# depth 12; modes 0 and 3; mode 4, maxima then sums, is the order the CUDA kernels take since
# 2026-12-03: merge_row_state) measured <= 9e-7 of them; the serial folds of 256 states (no kernel
# does that) up to 1.7e-5, from the 256 rounded additions of the sums z.
REL = {0: 4e-6, 1: 4e-5, 2: 4e-5, 3: 4e-6, 4: 4e-6}


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("T", [0.05, 1.0, 50.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("V", [7, 1271, 5003])
def test_merge_matches_oracle(harness, div, T, kind, V):
    g = torch.Generator().manual_seed(V * 7919 + KINDS.index(kind))
    t, s = _row(kind, V, T, g)
    a, b = t / T, s / T
    e, p, scale = _expected(div, t, s, T)
    lse_a = torch.logsumexp(a.double(), 0)
    lse_b = torch.logsumexp(b.double(), 0)
    for threads, chunk in SPLITS:
        for mode in (0, 1, 2, 3, 4):
            out = harness(div, a, b, threads, chunk, mode)
            what = f"{div} {kind} V={V} T={T} split={threads}x{chunk} mode={mode}"
            assert torch.isfinite(out).all(), f"{what}: {out}"
            # the normalisers: log z + m against float64 logsumexp
            assert abs(float(out[1]) + float(torch.log(out[2].double())) - float(lse_a)) <= \
                2e-7 * max(1.0, abs(float(lse_a))), what
            assert abs(float(out[3]) + float(torch.log(out[4].double())) - float(lse_b)) <= \
                2e-7 * max(1.0, abs(float(lse_b))), what
            # D: within twice plain fp32 PyTorch's error plus rounding of the cancelling terms
            err, plain = abs(float(out[0]) - float(e)), abs(float(p) - float(e))
            assert err <= 2.0 * plain + REL[mode] * scale + 1e-7, \
                f"{what}: D {float(out[0])!r} vs {float(e)!r}: error {err:.3e}, plain {plain:.3e}"


def test_merge_of_empty_states_is_exact(harness):
    """Lanes past V and all -inf parts are empty states (m = -inf, z = 0): merging them in any
    order must leave the others unchanged and never give NaN (no inf * 0)."""
    for div in ("forward_kl", "reverse_kl"):
        a = torch.tensor([0.5, -1.0, 2.0])
        b = torch.tensor([1.0, 0.25, -3.0])
        ref = harness(div, a, b, 1, 4, 1)  # one state: no merge at all
        for mode in (0, 1, 2, 3, 4):
            out = harness(div, a, b, 256, 4, mode)  # 255 empty states
            assert torch.equal(out, ref), (div, mode, out, ref)
        allneg = torch.full((9,), NEG_INF)
        out = harness(div, allneg, allneg, 64, 1, 0)
        assert out[2] == 0 and out[4] == 0 and out[1] == NEG_INF and out[3] == NEG_INF


# ---- the same rows through the C++ CPU op (OnlineKL::absorb per block of 1024) ------------------

CPU_REASON = cpp.unavailable_reason("cpu")


@pytest.mark.skipif(CPU_REASON is not None, reason=f"C++ CPU backend unavailable: {CPU_REASON}")
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("T", [0.05, 50.0])
@pytest.mark.parametrize("with_grad", [False, True], ids=["forward", "fused"])
def test_cpu_op_moving_maximum(div, T, with_grad):
    V = 5003  # five blocks of 1024, the last one partial
    g = torch.Generator().manual_seed(17)
    rows = [_row(k, V, T, g) for k in KINDS if k != "neg_inf_prefix"]
    t = torch.stack([r[0] for r in rows]).view(2, 3, V)
    s = torch.stack([r[1] for r in rows]).view(2, 3, V)
    x = s.clone().requires_grad_(with_grad)
    out = kd.kd_loss(x, t, div, temperature=T, reduction="none", backend="cpu")
    e, eg = oracle.loss_and_grad(s, t, divergence_name=div, temperature=T, reduction="none")
    p, pg = oracle.loss_and_grad(s, t, dtype=torch.float32, divergence_name=div, temperature=T,
                                 reduction="none")
    assert_close(out.detach(), e, torch.float32, plain=p, what=f"{div} T={T} loss")
    if with_grad:
        out.sum().backward()
        assert_close(x.grad, eg, torch.float32, plain=pg, what=f"{div} T={T} grad")
