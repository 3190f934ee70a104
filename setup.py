"""Build script: the pure-Python package plus the compiled extensions.

Install torch first, then ``pip install --no-build-isolation -e .`` (README explains why): the
extensions compile against the torch you run with.

* ``kdkernels._C``: the C++ CPU backend and the ``torch.ops.kdkernels_C`` schemas. Always built.
  ``-O3 -fopenmp -g0``, plus ``-mavx2 -mfma -mf16c`` (and ``-mavx512f/bw/vl/dq``) when the build
  machine has them (the per-element
  math is written for the compiler's vectorizer; ``-fno-trapping-math`` lets it if-convert).
* ``kdkernels._C_cuda``: the CUDA kernels (csrc/cuda), built when torch has CUDA and nvcc exists.

Environment: ``KDKERNELS_BUILD_CUDA=0/1`` forces the CUDA extension off/on;
``KDKERNELS_CPU_ARCH_FLAGS`` replaces the detected ISA flags (e.g. "" for a generic x86-64 build,
or "-march=native").
"""
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover
    sys.exit("kdkernels: install torch first, then `pip install --no-build-isolation -e .`")

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")


def _rel(*parts):
    return os.path.join("csrc", *parts)


_AVX2_TEST = ("#include <immintrin.h>\nint main(){__m256 a=_mm256_set1_ps(1.f);"
              "a=_mm256_fmadd_ps(a,a,a);__m128i h=_mm256_cvtps_ph(a,0);"
              "return (int)_mm256_cvtss_f32(_mm256_cvtph_ps(h))==2?0:1;}\n")
_AVX512_TEST = ("#include <immintrin.h>\nint main(){__m512 a=_mm512_set1_ps(1.f);"
                "a=_mm512_fmadd_ps(a,a,a);__m512i m=_mm512_set1_epi32(3);"
                "m=_mm512_maskz_add_epi16(0x3,m,m);"
                "return _mm512_reduce_add_ps(a)==32.f&&_mm512_reduce_add_epi32(m)==6?0:1;}\n")


def _compiler_accepts(flags, src=_AVX2_TEST):
    """True if the C++ compiler builds and the machine runs the program ``src`` with ``flags``."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        c, exe = os.path.join(d, "t.cpp"), os.path.join(d, "t")
        with open(c, "w") as f:
            f.write(src)
        try:
            subprocess.run([cxx, *flags, c, "-o", exe], check=True, capture_output=True)
            subprocess.run([exe], check=True, capture_output=True)
        except Exception:
            return False
    return True


def cpu_arch_flags():
    env = os.environ.get("KDKERNELS_CPU_ARCH_FLAGS")
    if env is not None:
        return env.split()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if _compiler_accepts(avx512, _AVX512_TEST):
        return avx512  # 16 fp32 lanes in the vectorized loops (measured: benchmarks/results)
    if _compiler_accepts(avx2):
        return avx2
    return []


def want_cuda():
    env = os.environ.get("KDKERNELS_BUILD_CUDA")
    if env is not None and env.strip() != "":
        return env.strip() not in ("0", "false", "no", "off")
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-std=c++17"] + cpu_arch_flags()

ext_modules = [
    CppExtension(
        "kdkernels._C",
        [_rel("bindings.cpp"), _rel("bindings_ensemble.cpp"), _rel("cpu", "kd_cpu.cpp"),
         _rel("cpu", "ensemble_cpu.cpp"), _rel("cpu", "sparse_cpu.cpp"), _rel("cpu", "mse_cpu.cpp")],
        include_dirs=[INCLUDE],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
]

if want_cuda():
    from torch.utils.cpp_extension import CUDAExtension

    ext_modules.append(
        CUDAExtension(
            "kdkernels._C_cuda",
            [_rel("cuda", "bindings_cuda.cpp"), _rel("cuda", "kd_cuda.cu"), _rel("cuda", "bindings_ensemble_cuda.cpp")],
            include_dirs=[INCLUDE],
            extra_compile_args={
                "cxx": ["-O3", "-g0", "-std=c++17"],
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                         "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90,code=sm_90"],
            },
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
