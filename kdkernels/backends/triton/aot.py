"""Ahead-of-time compile check of the Triton kernels for sm_80 and sm_90 (no GPU needed).

``compile_report()`` compiles each kernel at its default launch configuration
(``launch.DEFAULT_CONFIGS``) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap,
32))``, runs ``ptxas -v`` on the PTX and returns registers and spill bytes per compiled variant.
Under ``TRITON_INTERPRET=1`` the kernels are interpreter objects that cannot be compiled, so the
work then runs in a child process without that variable.

Command line: ``python -m kdkernels.backends.triton.aot`` prints the report as JSON lines.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence

CAPS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
N_DIVERGENCES = 6
# logit_mse (divergence id 6) has kernels of its own (mse_kernels.py), with no DIV constexpr
MSE_KERNELS = ("mse_fwd", "mse_bwd")
LOGIT_MSE = 6


def default_config(kernel: str, cap: int):
    """(BLOCK, num_warps) of ``kernel`` at its default launch configuration for sm_<cap>."""
    from .launch import DEFAULT_CONFIGS
    from .mse_launch import CONFIGS
    table = CONFIGS if kernel in MSE_KERNELS else DEFAULT_CONFIGS
    return table[(cap // 10, cap % 10)][kernel]


def find_ptxas() -> str:
    """ptxas next to nvcc, else the one bundled with triton."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        cand = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "ptxas")
        if os.path.exists(cand):
            return cand
        cand = os.path.join(os.path.dirname(nvcc), "ptxas")
        if os.path.exists(cand):
            return cand
    import triton
    cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(cand):
        return cand
    raise FileNotFoundError("ptxas not found (neither next to nvcc nor bundled with triton)")


ENSEMBLE_KERNELS = ("lse", "ens_fwd", "ens_bwd")


def _ensemble_signature(kernel: str, dtype: str, m: int) -> Dict[str, object]:
    """ensemble_kernels.py: the teachers as tuples of M pointers, row splits and row strides."""
    if kernel == "lse":
        return {"x_ptr": f"*{dtype}", "lab_ptr": "*i64", "stats_ptr": "*fp32", "W": "i32",
                "col": "i32", "V": "i32", "x_L": "i32", "x_sb": "i64", "x_sl": "i64",
                "k2": "fp32", "ignore_index": "i32", "HAS_LABELS": "constexpr",
                "BLOCK": "constexpr"}
    teachers = {"t_ptrs": (f"*{dtype}",) * m, "t_Ls": ("i32",) * m, "t_sbs": ("i64",) * m,
                "t_sls": ("i64",) * m, "w_ptr": "*fp32", "lab_ptr": "*i64"}
    tail = {"inv_T": "fp32", "param": "fp32", "soft_scale": "fp32", "hard_weight": "fp32",
            "ignore_index": "i32", "M": "constexpr", "DIV": "constexpr", "LIN": "constexpr",
            "SOFT": "constexpr",
            "HAS_LABELS": "constexpr", "HARD": "constexpr", "BLOCK": "constexpr"}
    rows = {"V": "i32", "s_L": "i32", "s_sb": "i64", "s_sl": "i64"}
    if kernel == "ens_fwd":
        return {"s_ptr": f"*{dtype}", **teachers, "loss_ptr": "*fp32", "stats_ptr": "*fp32",
                **rows, **tail}
    return {"s_ptr": f"*{dtype}", **teachers, "stats_ptr": "*fp32", "gl_ptr": "*fp32",
            "g_ptr": f"*{dtype}", **rows, "g_sb": "i64", "g_sl": "i64", **tail}


def _signature(kernel: str, dtype: str) -> Dict[str, str]:
    if kernel in MSE_KERNELS:  # mse_kernels.py (logit_mse): no T, no parameter, no DIV
        strides = {"V": "i32", "s_L": "i32", "s_sb": "i64", "s_sl": "i64",
                   "t_L": "i32", "t_sb": "i64", "t_sl": "i64"}
        tail = {"soft_weight": "fp32", "hard_weight": "fp32", "ignore_index": "i32",
                "SOFT": "constexpr", "HAS_LABELS": "constexpr", "HARD": "constexpr",
                "BLOCK": "constexpr"}
        if kernel == "mse_fwd":
            head = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "lab_ptr": "*i64",
                    "loss_ptr": "*fp32", "stats_ptr": "*fp32"}
            return {**head, **strides, **tail}
        head = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "lab_ptr": "*i64",
                "stats_ptr": "*fp32", "gl_ptr": "*fp32", "g_ptr": f"*{dtype}"}
        return {**head, **strides, "g_sb": "i64", "g_sl": "i64", **tail}
    common_tail = {"inv_T": "fp32", "param": "fp32", "soft_scale": "fp32", "hard_weight": "fp32",
                   "ignore_index": "i32", "DIV": "constexpr", "LIN": "constexpr",
                   "SOFT": "constexpr",
                   "HAS_LABELS": "constexpr", "HARD": "constexpr", "BLOCK": "constexpr"}
    strides = {"V": "i32", "s_L": "i32", "s_sb": "i64", "s_sl": "i64",
               "t_L": "i32", "t_sb": "i64", "t_sl": "i64"}
    if kernel == "fwd":
        head = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "lab_ptr": "*i64",
                "loss_ptr": "*fp32", "stats_ptr": "*fp32"}
        return {**head, **strides, **common_tail}
    if kernel == "given":  # kd_given_stats_kernel (vocab-parallel pass 2)
        head = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "lab_ptr": "*i64",
                "stats_ptr": "*fp32", "out_ptr": "*fp32"}
        return {**head, **strides, "inv_T": "fp32", "param": "fp32", "ignore_index": "i32",
                "DIV": "constexpr", "LIN": "constexpr", "HAS_LABELS": "constexpr",
                "BLOCK": "constexpr"}
    head = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "lab_ptr": "*i64", "stats_ptr": "*fp32",
            "gl_ptr": "*fp32", "g_ptr": f"*{dtype}"}
    return {**head, **strides, "g_sb": "i64", "g_sl": "i64", **common_tail}


def _parse_ptxas(text: str) -> Dict[str, int]:
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    if not (regs and stores and loads):
        raise RuntimeError(f"could not parse the ptxas report:\n{text}")
    return {"registers": int(regs.group(1)), "spill_stores": int(stores.group(1)),
            "spill_loads": int(loads.group(1)), "stack_frame": int(stack.group(1)) if stack else 0}


def compile_one(kernel: str, div: int, dtype: str, cap: int, soft: bool = True,
                has_labels: bool = True, hard: bool = True, ptxas: Optional[str] = None,
                m: int = 0, lin: Optional[bool] = None) -> dict:
    """Compile one variant; return its ptxas resource usage. ``m``: the number of teachers of
    the ensemble kernels ("ens_fwd", "ens_bwd"; "lse" has none); ``lin``: the LIN constexpr
    (default: the linear form for skew_kl, skew_reverse_kl)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import ensemble_kernels as EK
    from . import kernels as K
    from . import mse_kernels as M

    block, warps = default_config(kernel, cap)
    fn = {"fwd": K.kd_fwd_kernel, "bwd": K.kd_bwd_kernel, "given": K.kd_given_stats_kernel,
          "lse": EK.lse_rows_kernel, "ens_fwd": EK.ens_fwd_kernel, "ens_bwd": EK.ens_bwd_kernel,
          "mse_fwd": M.kd_mse_fwd_kernel, "mse_bwd": M.kd_mse_bwd_kernel}[kernel]
    # LIN: the skew divergences' linear form, the one a launch takes for parameters >= 2^-60
    # (launch.py _linear); the log-space form of smaller parameters has its own variant
    lin = div in K.LINEAR_DIVS if lin is None else lin
    constexprs = {"DIV": div, "LIN": lin, "SOFT": soft, "HAS_LABELS": has_labels, "HARD": hard,
                  "BLOCK": block}
    if kernel in ("given", "lse"):
        constexprs = {"DIV": div, "LIN": lin, "HAS_LABELS": has_labels, "BLOCK": block}
    if kernel == "lse":
        del constexprs["DIV"], constexprs["LIN"]
    if kernel in ("ens_fwd", "ens_bwd"):
        constexprs["M"] = m
    if kernel in MSE_KERNELS:
        constexprs = {"SOFT": soft, "HAS_LABELS": has_labels, "HARD": hard, "BLOCK": block}
    sig = (_ensemble_signature(kernel, dtype, m) if kernel in ENSEMBLE_KERNELS
           else _signature(kernel, dtype))
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": warps})
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas or find_ptxas(), f"-arch={arch}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return {"kernel": kernel, "div": div, "dtype": dtype, "cap": cap, "soft": soft,
            "has_labels": has_labels, "hard": hard, "block": block, "num_warps": warps, "m": m,
            **_parse_ptxas(out.stdout + out.stderr)}


def default_variants(dtypes: Sequence[str] = ("fp32", "bf16"), caps: Sequence[int] = CAPS,
                     divs: Iterable[int] = range(N_DIVERGENCES)) -> List[dict]:
    """Every kernel × divergence × dtype × target with all terms on (soft + labels + hard: the
    most live values), plus the soft-only variant of each divergence."""
    out = []
    for kernel, div, dtype, cap in itertools.product(("fwd", "bwd", "given"), divs, dtypes, caps):
        out.append(dict(kernel=kernel, div=div, dtype=dtype, cap=cap))
    for kernel, div in itertools.product(("fwd", "bwd"), divs):
        out.append(dict(kernel=kernel, div=div, dtype="bf16", cap=90, has_labels=False,
                        hard=False))
    # the ensemble kernels: two teachers everywhere, eight in bf16 on sm_90
    for dtype, cap in itertools.product(dtypes, caps):
        out.append(dict(kernel="lse", div=0, dtype=dtype, cap=cap))
    for kernel, div, dtype, cap in itertools.product(("ens_fwd", "ens_bwd"), divs, dtypes, caps):
        out.append(dict(kernel=kernel, div=div, dtype=dtype, cap=cap, m=2))
    for kernel, div in itertools.product(("ens_fwd", "ens_bwd"), divs):
        out.append(dict(kernel=kernel, div=div, dtype="bf16", cap=90, m=8))
    # logit_mse: its two kernels, every dtype and target with all terms on, and soft only
    for kernel, dtype, cap in itertools.product(MSE_KERNELS, dtypes, caps):
        out.append(dict(kernel=kernel, div=LOGIT_MSE, dtype=dtype, cap=cap))
    for kernel in MSE_KERNELS:
        out.append(dict(kernel=kernel, div=LOGIT_MSE, dtype="bf16", cap=90, has_labels=False,
                        hard=False))
    return out


def _compile_all(variants: List[dict], workers: int) -> List[dict]:
    ptxas = find_ptxas()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(lambda v: compile_one(**v, ptxas=ptxas), variants))


def compile_report(variants: Optional[List[dict]] = None, workers: int = 2) -> List[dict]:
    """Compile ``variants`` (default: ``default_variants()``) and return one dict per variant with
    registers, spill_stores, spill_loads and stack_frame bytes."""
    variants = default_variants() if variants is None else variants
    if os.environ.get("TRITON_INTERPRET") != "1":
        return _compile_all(variants, workers)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "kdkernels.backends.triton.aot", "--json-in",
                           json.dumps(variants), "--workers", str(workers)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-in", help="variants as a JSON list (default: default_variants())")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    variants = json.loads(args.json_in) if args.json_in else default_variants()
    for row in compile_report(variants, args.workers):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
