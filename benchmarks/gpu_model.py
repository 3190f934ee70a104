"""Static roofline model of every GPU kernel, from its SASS (no GPU needed).

For every Triton kernel variant the launchers pick on a training step (dense kd_loss: each
divergence, bf16/fp16/fp32, without labels, with labels, with labels and the hard term, hard term
alone; sparse_kd_loss: with and without the hard term) and for every CUDA kernel instantiation
(csrc/cuda/kd_cuda.cu), for sm_90a and sm_80:

1. The Triton launches are *recorded* by running the public API (``kd_loss(...).backward()`` on
   small CPU tensors) with every ``@triton.jit`` kernel of the backend replaced by a recorder: so
   the kernels, launch configurations (``launch.DEFAULT_CONFIGS`` for the target) and argument
   values are exactly the ones a training step uses. Each recorded launch is compiled with the
   specialization Triton's JIT computes from those very arguments (its own binder: 16-divisible
   pointers and integers get ``tt.divisibility=16``, integers equal to 1 become constants), for a
   row stride of the model shape (N = 8192, V = 128256, contiguous).
2. ``cuobjdump --dump-sass`` (shipped in the triton wheel) disassembles the cubin; backward
   branches delimit the hot loops (one loop = one pass over a row's vocabulary).
3. Per loop: SASS instructions, MUFU, BAR, SHFL per element, and global bytes per element from
   the LDG/STG widths; per kernel: registers, local memory (spills), shared memory.
4. Predicted time of a pass = max(memory time, issue time, MUFU time) with
   memory = N·V·bytes/elem / copy bandwidth, issue = warp-instructions / (SMs · clock · 4),
   MUFU = MUFU ops / (SMs · clock · 16); the per-row code outside the loops is added as issue time.
   Summed over the passes of every kernel of the training step (forward + backward).

It is a roofline: latency (too few warps in flight, barrier stalls) and L2 reuse are not modelled,
so it is a lower bound of the real time; barriers and shuffles per element are reported so that
latency-heavy loops stand out.

Run: ``python benchmarks/gpu_model.py`` (writes benchmarks/results/gpu-model/model.csv and
model.png); ``--help`` for subsets. Needs triton (for its compiler and cuobjdump) and, for the CUDA
kernels, nvcc.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "gpu-model")

# ---- the project's modules this tool reads: one place, so a moved package is one edit ----------
TRITON_PKG = "kdkernels.backends.triton"            # kernels.py, launch.py, sparse_kernels.py, sparse_launch.py
TRITON_MODULES = ("kernels", "launch", "sparse_kernels", "sparse_launch")
CUDA_SOURCE = os.path.join(ROOT, "csrc", "cuda", "kd_cuda.cu")
CUDA_INCLUDE = os.path.join(ROOT, "csrc", "include")
CUDA_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]  # as setup.py builds kdkernels._C_cuda
CUDA_LINEAR_DIVS = (2, 3, 4)  # kd_cuda.cu launch_which: LIN for jsd, skew_kl, skew_reverse_kl

# ---- machine constants, with sources ------------------------------------------------------------
# H100 SXM5 and H200 SXM: 132 SMs (NVIDIA H100 / H200 datasheets; 132 SMs read on the H200 of
# this workplace, PLATFORM.md). Clock: 1.98 GHz boost (datasheet), ~1.98 GHz under load measured
# here on the H200 (PLATFORM.md); the same used for the H100.
# Issue: 4 warp-instructions per clock per SM (4 SM sub-partitions, one dispatch each; Hopper and
# Ampere tuning guides). MUFU (ex2, lg2, rcp, rsq, sin, cos): 16 results per clock per SM on
# compute capability 8.0 and 9.0 (CUDA C++ Programming Guide, "Arithmetic Instructions"
# throughput table). Memory: device-to-device copy rate measured in this workplace (PLATFORM.md):
# H200 ~4.3 TB/s, H100 ~3.0 TB/s (a copy moves read + write bytes; that total is the rate).
CARDS = {
    "H100": dict(sms=132, clock_hz=1.98e9, copy_bw=3.0e12),
    "H200": dict(sms=132, clock_hz=1.98e9, copy_bw=4.3e12),
}
ISSUE_PER_CLK_SM = 4       # warp-instructions
MUFU_PER_CLK_SM = 16       # thread results
WARP = 32

# The model's problem: N rows of V columns (Llama-3 vocabulary), contiguous rows; K top-k slots of
# the sparse teacher.
MODEL_N = 8192
MODEL_V = 128256
MODEL_K = 64
RECORD_ROWS = 16           # rows of the CPU tensors the launches are recorded with: like N,
                           # a multiple of 16, so row counts and strides specialize as N's do
CAPS = (90, 80)
DTYPES = ("bf16", "fp16", "fp32")
DIV_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
# (has_labels, hard) label modes of the dense loss; plus "hard_only" (soft_weight = 0)
LABEL_MODES = (("nolabels", False, False), ("labels", True, False), ("hard", True, True))

# Loops of each kernel in source order: (extent, block constexpr). Loops a variant's constexprs
# remove drop out of the SASS; the SASS loops are matched to a prefix of this list (the removed
# ones are the last), so a kernel whose loop structure changes must be described here.
# A callable entry maps the variant's constexprs to that list (a loop removed in the middle).
# kd_rescale_kernel's loop runs only on rows whose grad_loss differs from the fused gradient's
# grad_scale: in the modelled step (loss.backward(), grad_loss = the hint) on none ("0" extent).
# kd_fwd_grad_kernel's reverse KL re-sums c in a pass of its own only on rows whose first
# block's maxima lie far from the row's (kernels.py FAR_CENTRES): in the modelled step on none.
def _fwd_grad_loops(ce):
    soft = ce.get("SOFT", True)
    mixture = soft and ce.get("DIV", 0) >= 2  # the loss / c pass
    resum = soft and ce.get("DIV", 0) == 1
    return (("V", "BLOCK"),) + ((("0", "BLOCK"),) if resum else ()) + \
        ((("V", "BLOCK"),) if mixture else ()) + (("V", "GBLOCK"),)


TRITON_LOOPS = {
    "kd_fwd_kernel": (("V", "BLOCK"), ("V", "BLOCK")),
    "kd_bwd_kernel": (("V", "BLOCK"),),
    "kd_fwd_grad_kernel": _fwd_grad_loops,
    "kd_rescale_kernel": (("0", "BLOCK"),),
    "sparse_stats_kernel": (("K", "BLOCK_K"), ("V", "BLOCK_V")),
    "sparse_grad_dense_kernel": (("V", "BLOCK_V"),),
    "sparse_grad_fixup_kernel": (("K", "BLOCK_K"),),
}


# ---- SASS parsing -------------------------------------------------------------------------------
@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    op: str        # full opcode with modifiers, e.g. LDG.E.128.CONSTANT
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """cuobjdump --dump-sass text -> {function name: instructions in address order}."""
    funcs: Dict[str, List[Instr]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        m = _LINE.search(line)
        if m:
            cur.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                             m.group(4).strip()))
    return funcs


def _branch_target(ins: Instr) -> Optional[int]:
    if ins.base not in ("BRA", "JMP"):
        return None
    m = re.search(r"0x([0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if m else None


def find_loops(instrs: List[Instr]) -> List[Tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to an earlier address.
    The padding self-loop after EXIT (BRA to itself) is no loop. Sorted by start address."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for i, ins in enumerate(instrs):
        tgt = _branch_target(ins)
        if tgt is not None and tgt < ins.addr and tgt in index:
            loops.append((index[tgt], i))
    # one entry per loop head (a loop with two back edges: keep the outermost edge)
    by_head: Dict[int, int] = {}
    for a, b in loops:
        by_head[a] = max(b, by_head.get(a, b))
    return sorted(by_head.items())


def top_level_loops(loops: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out = []
    for a, b in loops:
        if not any(a2 <= a and b <= b2 and (a2, b2) != (a, b) for a2, b2 in loops):
            out.append((a, b))
    return out


_WIDTH = re.compile(r"\.(8|16|32|64|128|256)\b")


def mem_bytes(ins: Instr) -> int:
    """Bytes one thread moves with a global load/store/atomic instruction (0 for others)."""
    if ins.base not in ("LDG", "STG", "RED", "ATOM", "ATOMG", "LDGSTS"):
        return 0
    m = _WIDTH.search(ins.op)
    if m:
        return int(m.group(1)) // 8
    if re.search(r"\.(U|S)8\b", ins.op):
        return 1
    if re.search(r"\.(U|S)16\b", ins.op):
        return 2
    return 4


@dataclasses.dataclass
class Counts:
    sass: int = 0
    mufu: int = 0
    bar: int = 0
    shfl: int = 0
    ldg_bytes: int = 0
    stg_bytes: int = 0
    local: int = 0      # LDL / STL (spills)
    branches: int = 0   # forward branches inside the range

    def add(self, ins: Instr) -> None:
        if ins.base == "NOP":
            return
        self.sass += 1
        b = ins.base
        self.mufu += b == "MUFU"
        self.bar += b == "BAR"
        self.shfl += b == "SHFL"
        self.local += b in ("LDL", "STL")
        nbytes = mem_bytes(ins)
        if b in ("LDG", "LDGSTS"):
            self.ldg_bytes += nbytes
        else:
            self.stg_bytes += nbytes
        tgt = _branch_target(ins)
        self.branches += tgt is not None and tgt > ins.addr

    def plus(self, o: "Counts") -> "Counts":
        return Counts(*(getattr(self, f.name) + getattr(o, f.name)
                        for f in dataclasses.fields(self)))


def count(instrs: Sequence[Instr]) -> Counts:
    c = Counts()
    for ins in instrs:
        c.add(ins)
    return c


_PTX_MEM = re.compile(r"\b(ld|st|atom|red)\.global((?:\.[a-z0-9]+)*)")


def ptx_loop_bytes(ptx: str) -> List[int]:
    """Global bytes one thread moves per iteration of each top-level PTX loop (a ``bra`` back to
    an earlier label), in order. ptxas may unroll a loop; the SASS bytes of the same loop divided
    by these give the unroll factor."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*(\$L__\w+):", line)
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    loops = [(a, b) for a, b in loops
             if not any(a2 <= a and b <= b2 and (a2, b2) != (a, b) for a2, b2 in loops)]
    out = []
    for a, b in sorted(loops):
        total = 0
        for line in lines[a:b + 1]:
            m = _PTX_MEM.search(line)
            if not m:
                continue
            mods = m.group(2).split(".")
            vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d", x)), 1)
            bits = next((int(x[1:]) for x in mods if re.fullmatch(r"[bsuf]\d+", x)), 32)
            total += vec * bits // 8
        out.append(total)
    return out


# ---- tools --------------------------------------------------------------------------------------
def triton_bin(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (neither in the triton wheel nor on PATH)")


def dump_sass(cubin: bytes) -> Tuple[str, str]:
    """(SASS text, resource-usage text) of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return dump_sass_file(path)


def dump_sass_file(path: str) -> Tuple[str, str]:
    tool = triton_bin("cuobjdump")
    sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True)
    res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True)
    return sass.stdout, res.stdout


def parse_res_usage(text: str) -> Dict[str, Dict[str, int]]:
    """cuobjdump -res-usage -> {function: {REG, STACK, SHARED, LOCAL}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return out


# ---- recording the Triton launches of a training step ---------------------------------------------
@dataclasses.dataclass
class Launch:
    kernel: str
    fn: object            # the JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(_kernel_name(self.fn), self.fn, args, dict(kwargs)))
        return launch


def _kernel_name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


def _kernel_types() -> tuple:
    """JIT kernel classes: JITFunction, and InterpretedFunction under TRITON_INTERPRET=1 (then the
    launches can be recorded but not compiled)."""
    from triton.runtime.jit import JITFunction
    types = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        types.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _triton_modules():
    import importlib
    return [importlib.import_module(f"{TRITON_PKG}.{m}") for m in TRITON_MODULES]


def record_launches(fn_call, cap: int) -> List[Launch]:
    """Run ``fn_call()`` (public API calls on CPU tensors) with every Triton kernel of the backend
    replaced by a recorder and the launcher configured as on a GPU of compute capability ``cap``.
    Returns the launches in order."""
    import torch

    kernel_types = _kernel_types()
    mods = _triton_modules()
    launch_mod = mods[TRITON_MODULES.index("launch")]
    log: List[Launch] = []
    saved = []
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, kernel_types):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, log))

    class _FakeCuda:  # what launch._config reads of the device
        type = "cuda"

    orig_config = launch_mod._config
    orig_cap = torch.cuda.get_device_capability
    env = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "KDKERNELS_TRITON_BLOCK",
                                          "KDKERNELS_AUTOTUNE")}
    try:
        # the launchers accept CPU tensors only "under the interpreter"; kernels are recorders
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.pop("KDKERNELS_TRITON_BLOCK", None)
        os.environ.pop("KDKERNELS_AUTOTUNE", None)
        torch.cuda.get_device_capability = lambda device=None: divmod(cap, 10)
        launch_mod._config = lambda kind, device, V: orig_config(kind, _FakeCuda, V)
        fn_call()
    finally:
        launch_mod._config = orig_config
        torch.cuda.get_device_capability = orig_cap
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, name, obj in saved:
            setattr(mod, name, obj)
    return log


def _torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def dense_training_step(div: int, dtype: str, mode: str, V: int = MODEL_V,
                        grad_inplace: bool = False):
    """kd_loss(...).backward() on RECORD_ROWS rows, backend triton. mode: nolabels | labels |
    hard | hard_only. The fused path (kd_fwd_grad_kernel + kd_rescale_kernel); with
    ``grad_inplace`` the two-kernel path (kd_fwd_kernel + kd_bwd_kernel)."""
    import torch
    import kdkernels as kd

    def call():
        g = torch.Generator().manual_seed(0)
        s = torch.randn(1, RECORD_ROWS, V, generator=g).to(_torch_dtype(dtype)).requires_grad_()
        t = torch.randn(1, RECORD_ROWS, V, generator=g).to(_torch_dtype(dtype))
        if grad_inplace:
            s = s * 1  # a non-leaf (an lm_head output): its storage takes the gradient
        labels = None if mode == "nolabels" else torch.randint(0, V, (1, RECORD_ROWS), generator=g)
        hw = 0.5 if mode in ("hard", "hard_only") else 0.0
        sw = 0.0 if mode == "hard_only" else 1.0
        loss = kd.kd_loss(s, t, divergence=DIV_NAMES[div], temperature=2.0, labels=labels,
                          soft_weight=sw, hard_weight=hw, backend="triton",
                          grad_inplace=grad_inplace)
        loss.backward()
    return call


def sparse_training_step(dtype: str, hard: bool, V: int = MODEL_V, K: int = MODEL_K):
    import torch
    import kdkernels as kd

    def call():
        g = torch.Generator().manual_seed(0)
        s = torch.randn(1, RECORD_ROWS, V, generator=g).to(_torch_dtype(dtype)).requires_grad_()
        idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(RECORD_ROWS)])
        lp = torch.log_softmax(torch.randn(RECORD_ROWS, K, generator=g), -1)
        labels = torch.randint(0, V, (RECORD_ROWS,), generator=g)
        loss = kd.sparse_kd_loss(s.view(RECORD_ROWS, V), idx, lp, temperature=2.0,
                                 labels=labels if hard else None,
                                 hard_weight=0.5 if hard else 0.0, backend="triton")
        loss.backward()
    return call


def specialize(launch: Launch, cap: int):
    """signature, constexprs, attrs and options exactly as the JIT derives them."""
    from triton.compiler.compiler import make_backend
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", cap, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    return fn._pack_args(backend, dict(launch.kwargs), bound, spec, opts)


def compile_launch(launch: Launch, cap: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = specialize(launch, cap)
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    ck = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
    sass, res = dump_sass(ck.asm["cubin"])
    names = {launch.fn.arg_names[k[0]]: v for k, v in constexprs.items()}
    return dict(sass=sass, res=res, ptx=ck.asm["ptx"], ptx_loop_bytes=ptx_loop_bytes(ck.asm["ptx"]),
                shared=int(ck.metadata.shared),
                num_warps=int(ck.metadata.num_warps), constexprs=names)


# ---- the model ------------------------------------------------------------------------------------
def card_times(elems: float, bytes_per_elem: float, warp_instr: float, mufu_ops: float) -> dict:
    out = {}
    for card, c in CARDS.items():
        mem = elems * bytes_per_elem / c["copy_bw"]
        issue = warp_instr / (c["sms"] * c["clock_hz"] * ISSUE_PER_CLK_SM)
        mufu = mufu_ops / (c["sms"] * c["clock_hz"] * MUFU_PER_CLK_SM)
        out[card] = dict(mem_ms=mem * 1e3, issue_ms=issue * 1e3, mufu_ms=mufu * 1e3,
                         ms=max(mem, issue, mufu) * 1e3)
    return out


def analyse_kernel(name: str, instrs: List[Instr], threads: int, elems_per_iter: Sequence[float],
                   extents: Sequence[int], rows: int, res: dict, shared: int) -> List[dict]:
    """Per-loop rows + a kernel "rest" row (the longest path through the code outside the loops,
    once per row).
    ``elems_per_iter[i]``: elements of a row one iteration of loop i covers (all threads)."""
    loops = top_level_loops(find_loops(instrs))
    if len(loops) > len(elems_per_iter):
        raise RuntimeError(f"{name}: {len(loops)} loops in the SASS, {len(elems_per_iter)} described")
    warps = threads // WARP
    total = count(instrs)
    out = []
    for i, (a, b) in enumerate(loops):
        c = count(instrs[a:b + 1])
        nested = len([1 for a2, b2 in find_loops(instrs) if a < a2 and b2 <= b])
        per_thread = elems_per_iter[i] / threads        # elements one thread handles per iteration
        iters = math.ceil(extents[i] / elems_per_iter[i])
        elems = rows * extents[i]
        per = lambda x: x / per_thread  # noqa: E731  per element
        warp_instr = rows * iters * c.sass * warps
        mufu_ops = rows * iters * c.mufu * threads
        bpe = (c.ldg_bytes + c.stg_bytes) / per_thread
        row = dict(loop=i, sass_per_elem=per(c.sass), mufu_per_elem=per(c.mufu),
                   bar_per_elem=per(c.bar), shfl_per_elem=per(c.shfl), bytes_per_elem=bpe,
                   ld_bytes_per_elem=per(c.ldg_bytes), st_bytes_per_elem=per(c.stg_bytes),
                   loop_sass=c.sass, inner_branches=c.branches, nested_loops=nested,
                   extent=extents[i], elems_per_iter=elems_per_iter[i])
        for card, t in card_times(elems, bpe, warp_instr, mufu_ops).items():
            row.update({f"{card}_{k}": v for k, v in t.items()})
        out.append(row)
    rest = straight_line_longest(instrs, loops)  # the longest path outside the loops
    row = dict(loop="rest", rest_sass=rest.sass)
    for card, t in card_times(0, 0, rows * rest.sass * warps, rows * rest.mufu * threads).items():
        row.update({f"{card}_{k}": v for k, v in t.items()})
    out.append(row)
    for r in out:
        r.update(kernel=name, threads=threads, registers=res.get("REG", 0),
                 local_bytes=res.get("LOCAL", 0), spill_instr=total.local,
                 shared_bytes=shared + res.get("SHARED", 0), total_sass=total.sass,
                 n_loops=len(loops))
    return out


def loop_unrolls(name: str, instrs: List[Instr], ptx_bytes: List[int]) -> List[int]:
    """ptxas unroll factor of each top-level loop: its SASS global bytes over its PTX bytes."""
    loops = top_level_loops(find_loops(instrs))
    if len(ptx_bytes) != len(loops):
        raise RuntimeError(f"{name}: {len(loops)} SASS loops but {len(ptx_bytes)} PTX loops")
    unroll = []
    for (a, b), pb in zip(loops, ptx_bytes):
        c = count(instrs[a:b + 1])
        sb = c.ldg_bytes + c.stg_bytes
        u = sb / pb if pb else 1
        if u != int(u) or u < 1:
            raise RuntimeError(f"{name}: SASS loop moves {sb} B, PTX loop {pb} B per thread")
        unroll.append(int(u))
    return unroll


def triton_launch_rows(launch: Launch, cap: int, compiled: dict) -> List[dict]:
    name = launch.kernel
    if name not in TRITON_LOOPS:
        raise RuntimeError(f"kernel {name} has no entry in TRITON_LOOPS (benchmarks/gpu_model.py)")
    funcs = parse_sass(compiled["sass"])
    if len(funcs) != 1:
        raise RuntimeError(f"{name}: expected one function in the cubin, got {list(funcs)}")
    (fname, instrs), = funcs.items()
    res = parse_res_usage(compiled["res"]).get(fname, {})
    ce = compiled["constexprs"]
    ext = {"V": MODEL_V, "K": MODEL_K, "0": 0}
    desc = TRITON_LOOPS[name]
    if callable(desc):
        desc = desc(ce)
    threads = compiled["num_warps"] * WARP
    unroll = loop_unrolls(name, instrs, compiled["ptx_loop_bytes"])
    elems = [ce[blk] * u for (_, blk), u in zip(desc, unroll)]
    rows = analyse_kernel(name, instrs, threads, elems + [ce[blk] for _, blk in desc[len(elems):]],
                          [ext[e] for e, _ in desc], MODEL_N, res, compiled["shared"])
    for r, u in zip(rows, unroll):
        r["unroll"] = u
    flags = {k: v for k, v in ce.items() if k not in ("BLOCK", "BLOCK_V", "BLOCK_K", "GBLOCK")}
    for r in rows:
        r.update(block=ce.get("BLOCK", ce.get("BLOCK_V", ce.get("BLOCK_K"))), constexprs=json.dumps(flags,
                                                                                 sort_keys=True))
    return rows


def _launch_key(launch: Launch, cap: int):
    options, signature, constexprs, attrs = specialize(launch, cap)
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    return (launch.kernel, cap, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
            repr(sorted(attrs.items())), repr(sorted(opts.items())))


def triton_variants(caps=CAPS, dtypes=DTYPES, divs=range(6), modes=None, sparse=True,
                    two_kernel=True):
    """[(variant dict, [Launch])] for every training step the model covers: op "kd_loss" the
    fused training path kd_loss picks, "kd_loss_2k" the two-kernel path (grad_inplace=True;
    kd_fwd_kernel is also the forward-only call's kernel)."""
    modes = modes or [m for m, _, _ in LABEL_MODES] + ["hard_only"]
    out = []
    for cap in caps:
        for dtype in dtypes:
            for mode in modes:
                for div in (divs if mode != "hard_only" else [0]):
                    for op, inplace in (("kd_loss", False), ("kd_loss_2k", True))[:1 + two_kernel]:
                        launches = record_launches(
                            dense_training_step(div, dtype, mode, grad_inplace=inplace), cap)
                        out.append((dict(impl="triton", op=op, cap=cap, dtype=dtype,
                                         div=DIV_NAMES[div] if mode != "hard_only" else "-",
                                         mode=mode), launches))
            if sparse:
                for hard in (False, True):
                    launches = record_launches(sparse_training_step(dtype, hard), cap)
                    out.append((dict(impl="triton", op="sparse_kd_loss", cap=cap, dtype=dtype,
                                     div="forward_kl", mode="hard" if hard else "labels_free"),
                                launches))
    return out


def model_triton(variants, workers: int = 2) -> List[dict]:
    keys = {}
    for v, launches in variants:
        for ln in launches:
            keys.setdefault(_launch_key(ln, v["cap"]), (ln, v["cap"]))
    uniq = list(keys.items())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        compiled = dict(zip([k for k, _ in uniq],
                            ex.map(lambda kv: compile_launch(*kv[1]), uniq)))
    rows = []
    for v, launches in variants:
        for i, ln in enumerate(launches):
            for r in triton_launch_rows(ln, v["cap"], compiled[_launch_key(ln, v["cap"])]):
                rows.append({**v, "launch": i, **r})
    return rows


# ---- CUDA kernels -----------------------------------------------------------------------------
CUDA_DTYPES = {"float": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16"}
CUDA_THREADS = 256  # kd_cuda.cu THREADS
CUDA_CLUSTER_BYTES = 72 * 1024  # kd_cuda.cu cluster_budget(): shared memory per CTA, default
CUDA_CLUSTER_HEAD = 368         # kd_cuda.cu ClusterLayout::HEAD floats * 4


def compile_cuda(cap: int) -> Tuple[str, str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "k.cubin")
        subprocess.run([nvcc, "-cubin", *CUDA_FLAGS, f"-arch=sm_{cap}", "-I", CUDA_INCLUDE,
                        CUDA_SOURCE, "-o", out], check=True, capture_output=True, text=True)
        return dump_sass_file(out)


def demangle(names: Sequence[str]) -> Dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, proc.stdout.splitlines()))


def path_extremes(instrs: List[Instr], a: int, b: int) -> Dict[Tuple[int, int, int], Tuple[Counts, Counts]]:
    """Paths from loop head a to its back edge b through the loop body's forward branches, by
    dynamic programming over the body (a DAG once the back edges are cut; a branch out of [a, b]
    counts as not taken). Only paths whose global accesses are all 16-byte vectors are kept (the
    aligned fast path). Returns {(vector loads, vector stores, 16-byte shared loads):
    (shortest, longest) counts}."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    states: Dict[int, Dict[Tuple[int, int, int], Tuple[Counts, Counts]]] = {a: {(0, 0, 0): (Counts(), Counts())}}

    def merge(i, key, lo, hi):
        d = states.setdefault(i, {})
        if key in d:
            lo0, hi0 = d[key]
            lo = lo if lo.sass < lo0.sass else lo0
            hi = hi if hi.sass > hi0.sass else hi0
        d[key] = (lo, hi)

    for i in range(a, b + 1):
        if i not in states:
            continue
        ins = instrs[i]
        nbytes = mem_bytes(ins)
        if nbytes not in (0, 16):
            continue  # scalar path: dropped
        lds = ins.base == "LDS" and ".128" in ins.op
        for (nld, nst, nlds), (lo, hi) in states.pop(i).items():
            lo2, hi2 = dataclasses.replace(lo), dataclasses.replace(hi)
            lo2.add(ins)
            hi2.add(ins)
            key = (nld + (nbytes and ins.base == "LDG"), nst + (nbytes and ins.base == "STG"),
                   nlds + lds)
            if i == b:
                merge(-1, key, lo2, hi2)
                continue
            tgt = _branch_target(ins)
            if ins.base == "EXIT" and not ins.pred:
                continue
            taken = tgt is not None and tgt > ins.addr and tgt in index and index[tgt] <= b
            if taken:
                merge(index[tgt], key, lo2, hi2)
            if not (taken and ins.pred in ("", "@PT")):
                merge(i + 1, key, lo2, hi2)
    return states.get(-1, {})


def straight_line_longest(instrs: List[Instr], loops: List[Tuple[int, int]]) -> Counts:
    """Counts of the longest path from the kernel's entry to an EXIT with every loop of ``loops``
    (top-level, [first, last] indices) collapsed to nothing: what one thread runs outside the
    loops, at most, on any one path (the ignored-row and live paths are exclusive branches, not
    summed). A subroutine call (CALL.REL: 64-bit division's slow path) adds its whole body up to
    its RET. Dynamic programming in address order: the code is a DAG once the loops are cut."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    heads = {a: b for a, b in loops}
    best: Dict[int, Counts] = {0: Counts()}
    done: Optional[Counts] = None

    def reach(i, c):
        if i < len(instrs) and (i not in best or best[i].sass < c.sass):
            best[i] = c

    def finish(c):
        nonlocal done
        if done is None or c.sass > done.sass:
            done = c

    for i, ins in enumerate(instrs):
        if i not in best:
            continue
        c = best.pop(i)
        if i in heads:  # the loop's cost is the pass's: continue after it, or where it exits to
            b = heads[i]
            reach(b + 1, c)
            for ins2 in instrs[i:b + 1]:
                tgt = _branch_target(ins2)
                if tgt is not None and tgt in index and index[tgt] > b:
                    reach(index[tgt], c)
            continue
        c2 = dataclasses.replace(c)
        c2.add(ins)
        if ins.base == "CALL":
            m = re.search(r"0x([0-9a-f]+)", ins.args)
            t = index.get(int(m.group(1), 16)) if m else None
            if t is not None:
                end = next((k for k in range(t, len(instrs)) if instrs[k].base == "RET"), len(instrs) - 1)
                c2 = c2.plus(count(instrs[t:end + 1]))
        if ins.base == "EXIT":
            finish(c2)
            if not ins.pred or ins.pred == "@PT":
                continue
        tgt = _branch_target(ins)
        forward = tgt is not None and tgt > ins.addr and tgt in index
        if forward:
            reach(index[tgt], c2)
        if not (tgt is not None and ins.pred in ("", "@PT")):
            reach(i + 1, c2)
    return done or Counts()


def cuda_loop_counts(instrs: List[Instr], a: int, b: int, want_ld: int, want_st: int,
                     extra: bool, want_lds: int = 0, widest: bool = False):
    """Counts of the path through loop [a, b] a variant takes: 16-byte vector accesses only (the
    aligned path), ``want_ld`` vector loads, ``want_st`` vector stores and ``want_lds`` 16-byte
    shared-memory loads per chunk (or a multiple: an unrolled loop); the longest such path when
    ``extra`` (an optional runtime term, the hard term, is on), else the shortest; the least
    unrolled match, or the most when ``widest`` (cluster_grad_kernel's copy, 4 chunks in flight,
    whose tail takes fewer). Returns ((counts, unroll), number of access patterns)."""
    ext = path_extremes(instrs, a, b)
    cands = []
    for (nld, nst, nlds), (lo, hi) in ext.items():
        # the first access kind asked for gives the unroll; the others must match it
        first, got = next(((w, n) for w, n in zip((want_ld, want_st, want_lds), (nld, nst, nlds)) if w), (0, 0))
        unroll = got // first if first else 1
        if unroll == 0 or (nld, nst, nlds) != (want_ld * unroll, want_st * unroll, want_lds * unroll):
            continue
        cands.append(((hi if extra else lo), unroll))
    if not cands:
        return None, 0
    cands.sort(key=lambda cu: cu[1], reverse=widest)
    return cands[0], len(ext)


def model_cuda(caps=CAPS, dtypes=DTYPES, divs=range(6)) -> List[dict]:
    """The CUDA training step: op "kd_loss" the fused forward_grad_kernel (soft + hard term
    instantiation), op "kd_loss_2k" forward_kernel + backward_kernel, per (dtype, divergence),
    each modelled on its longest aligned path (every term on: mode "hard"; see cuda_loop_counts)."""
    rows = []
    for cap in caps:
        sass, res_text = compile_cuda(cap)
        funcs = parse_sass(sass)
        res = parse_res_usage(res_text)
        dem = demangle(list(funcs))
        found = {}
        # the instantiation a call with the default parameter launches: LIN (linear-form terms)
        # for jsd, skew_kl and skew_reverse_kl (beta, alpha >= 2^-60), the log-space form otherwise
        for mangled, pretty in dem.items():
            m = re.search(r"(forward|backward)_kernel<([^,>]+), (\d+), true, true, (true|false)>",
                          pretty)
            if m and (m.group(4) == "true") == (int(m.group(3)) in CUDA_LINEAR_DIVS):
                found[(m.group(1), CUDA_DTYPES.get(m.group(2).strip(), m.group(2)),
                       int(m.group(3)))] = mangled
            m = re.search(r"forward_grad_kernel<([^,>]+), (\d+), true, true, true, (true|false)>",
                          pretty)
            if m and (m.group(3) == "true") == (int(m.group(2)) in CUDA_LINEAR_DIVS):
                found[("fused", CUDA_DTYPES.get(m.group(1).strip(), m.group(1)),
                       int(m.group(2)))] = mangled
            m = re.search(r"cluster_grad_kernel<([^,>]+), (\d+), true, true, (true|false)>", pretty)
            if m and (m.group(3) == "true") == (int(m.group(2)) in CUDA_LINEAR_DIVS):
                found[("cluster", CUDA_DTYPES.get(m.group(1).strip(), m.group(1)),
                       int(m.group(2)))] = mangled
        for dtype in dtypes:
            esize = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
            vec = 16 // esize
            for div in divs:
                # runtime flags select paths inside one instantiation, and the branches on one
                # flag are not correlated by this path search: only the longest aligned path
                # (soft + hard term on) is modelled, an upper bound for calls without the hard term
                for mode, has_labels, hard in LABEL_MODES[-1:]:
                    # sm_90: the launcher's training step is cluster_grad_kernel (the row on
                    # chip; forward_grad_kernel, op kd_loss_1cta, where no cluster fits)
                    ops = ((("kd_loss", ("cluster",)), ("kd_loss_1cta", ("fused",))) if cap >= 90
                           else (("kd_loss", ("fused",)),)) + (("kd_loss_2k", ("forward", "backward")),)
                    for op, kinds in ops:
                        v = dict(impl="cuda", op=op, cap=cap, dtype=dtype, div=DIV_NAMES[div],
                                 mode=mode)
                        for li, kind in enumerate(kinds):
                            mangled = found.get((kind, dtype, div))
                            if mangled is None:
                                raise RuntimeError(f"CUDA {kind} kernel <{dtype}, {div}> not found")
                            rows += cuda_kernel_rows(v, li, kind, div, funcs[mangled],
                                                     res.get(mangled, {}), vec, hard, esize)
    return rows


def cluster_size(V: int, esize: int, budget: int = CUDA_CLUSTER_BYTES) -> Tuple[int, int]:
    """kd_cuda.cu launch_cluster_grad: (CTAs per row, chunks per CTA) of cluster_grad_kernel, or
    (0, 0) where no cluster fits the budget."""
    vec = 16 // esize
    chunks = -(-V // vec) + 1
    for c in (1, 2, 4, 8, 16):
        per = -(-chunks // c)
        if CUDA_CLUSTER_HEAD + 2 * per * 16 <= budget:
            return c, per
    return 0, 0


def cuda_kernel_rows(v, li, kind, div, instrs, res, vec, hard, esize=2) -> List[dict]:
    """Loops of forward_kernel: statistics pass, then (divergences 2..5) the second pass.
    backward_kernel: zero-fill of ignored rows, (reverse KL) the c' pass, the gradient pass.
    cluster_grad_kernel: zero-fill, the copy of the row's slice into shared memory, then the
    passes of forward_grad_kernel on the slice (16-byte shared loads), over C CTAs a row; its
    time is max(memory, issue, MUFU) summed over the kernel, not per pass ("overlap": the copy of
    one CTA overlaps the passes of the two others resident on the SM, 72 KiB each).
    Loops are matched by their accesses: vector loads / stores per chunk."""
    loops = top_level_loops(find_loops(instrs))
    online = div in (0, 1)
    C, chunks = 1, 0
    if kind == "forward":
        want = [("stats", 2, 0, hard)] + ([] if online else [("div", 2, 0, False)])
    elif kind == "fused":  # forward_grad_kernel: the forward's passes, then backward's
        # reverse KL on fixed centres: no c' pass; its "resum" loop (c again on the row's maxima)
        # runs only on rows whose first chunk lies far below the rest (forward_row's FIXED)
        want = [("zero", 0, 1, False), ("stats", 2, 0, hard)] + \
               ([] if online else [("div", 2, 0, False)]) + \
               ([("resum", 2, 0, False)] if div == 1 else []) + [("grad", 2, 1, hard)]
    elif kind == "cluster":
        C, chunks = cluster_size(MODEL_V, esize)
        # the copy on its longest path: the shortest skips the shared stores (and the maxima) of
        # chunks it loaded, a path no thread takes (the two `k < per` tests are one)
        want = [("zero", 0, 1, False), ("copy", 2, 0, True, 0, True), ("stats", 0, 0, hard, 2)] + \
               ([] if online else [("div", 0, 0, False, 2)]) + [("grad", 0, 1, hard, 2)]
    else:
        want = [("zero", 0, 1, False)] + ([("cprime", 2, 0, False)] if div == 1 else []) + \
               [("grad", 2, 1, hard)]
    threads = CUDA_THREADS
    warps = threads // WARP
    total = count(instrs)
    used = set()
    out = []
    for pname, nld, nst, extra, *more in want:
        nlds, widest = (list(more) + [0, False])[:2]
        best = None
        for li2, (a, b) in enumerate(loops):
            if li2 in used:
                continue
            c, ncand = cuda_loop_counts(instrs, a, b, nld, nst, extra, nlds, widest)
            if c is not None:
                best = (li2, c, ncand)
                break
        if best is None:
            raise RuntimeError(f"CUDA {kind} div {div}: no loop matches pass {pname}")
        li2, (c, unroll), ncand = best
        used.add(li2)
        if pname in ("zero", "resum"):
            continue  # runs only on ignored rows / on rows with far centres
        per_thread = vec * unroll
        per = lambda x: x / per_thread  # noqa: E731
        elems = MODEL_N * MODEL_V
        # iterations of a row, over its CTAs: C of `per` chunks each (cluster_grad_kernel)
        iters = (C * math.ceil(chunks * vec / (threads * per_thread)) if kind == "cluster"
                 else math.ceil(MODEL_V / (threads * per_thread)))
        bpe = (c.ldg_bytes + c.stg_bytes) / per_thread
        row = dict(loop=pname, sass_per_elem=per(c.sass), mufu_per_elem=per(c.mufu),
                   bar_per_elem=per(c.bar), shfl_per_elem=per(c.shfl), bytes_per_elem=bpe,
                   ld_bytes_per_elem=per(c.ldg_bytes), st_bytes_per_elem=per(c.stg_bytes),
                   loop_sass=c.sass, inner_branches=c.branches, nested_loops=0,
                   extent=MODEL_V, elems_per_iter=threads * per_thread, paths=ncand)
        t = card_times(elems, bpe, MODEL_N * iters * c.sass * warps,
                       MODEL_N * iters * c.mufu * threads)
        for card, tt in t.items():
            row.update({f"{card}_{k}": x for k, x in tt.items()})
        out.append(row)
    # the code outside the passes' loops: its longest path from entry to exit (the ignored-row
    # and the live path are exclusive; a loop no pass matched counts its body once), run by
    # every warp of every CTA of the row
    rest = straight_line_longest(instrs, [loops[i] for i in sorted(used)])
    row = dict(loop="rest", rest_sass=rest.sass)
    for card, tt in card_times(0, 0, MODEL_N * C * rest.sass * warps, MODEL_N * C * rest.mufu * threads).items():
        row.update({f"{card}_{k}": x for k, x in tt.items()})
    out.append(row)
    for r in out:
        if kind == "cluster":
            r.update(overlap=1)
        r.update(v, launch=li, kernel={"fused": "forward_grad_kernel", "cluster": "cluster_grad_kernel"}.get(
                     kind, f"{kind}_kernel"),
                 threads=threads,
                 registers=res.get("REG", 0), local_bytes=res.get("LOCAL", 0),
                 spill_instr=total.local, shared_bytes=res.get("SHARED", 0),
                 total_sass=total.sass, n_loops=len(loops), block=threads * vec,
                 constexprs=json.dumps({"DIV": div}))
    return out


# ---- summaries, CSV, plot ------------------------------------------------------------------------
COLUMNS = ["impl", "op", "cap", "dtype", "div", "mode", "launch", "kernel", "loop", "block",
           "threads", "registers", "local_bytes", "spill_instr", "shared_bytes", "total_sass",
           "n_loops", "loop_sass", "unroll", "extent", "elems_per_iter", "sass_per_elem", "mufu_per_elem",
           "bar_per_elem", "shfl_per_elem", "bytes_per_elem", "ld_bytes_per_elem",
           "st_bytes_per_elem", "inner_branches", "nested_loops", "rest_sass",
           "H100_mem_ms", "H100_issue_ms", "H100_mufu_ms", "H100_ms",
           "H200_mem_ms", "H200_issue_ms", "H200_mufu_ms", "H200_ms", "constexprs"]


def totals(rows: List[dict]) -> List[dict]:
    """One TOTAL row per training step (impl, op, cap, dtype, div, mode): sums of the pass times,
    of bytes and SASS per element over the passes that walk V, and the bound of each pass."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r.get("loop") == "TOTAL":
            continue
        groups.setdefault(tuple(r[k] for k in ("impl", "op", "cap", "dtype", "div", "mode")),
                          []).append(r)
    out = []
    for key, rs in groups.items():
        v_passes = [r for r in rs if r.get("extent") == MODEL_V]
        t = dict(zip(("impl", "op", "cap", "dtype", "div", "mode"), key), loop="TOTAL",
                 kernel="+".join(dict.fromkeys(r["kernel"] for r in rs)),
                 launch=len({r["launch"] for r in rs}),
                 n_loops=len(v_passes),
                 bytes_per_elem=sum(r["bytes_per_elem"] for r in v_passes),
                 sass_per_elem=sum(r["sass_per_elem"] for r in v_passes),
                 mufu_per_elem=sum(r["mufu_per_elem"] for r in v_passes),
                 bar_per_elem=sum(r["bar_per_elem"] for r in v_passes),
                 shfl_per_elem=sum(r["shfl_per_elem"] for r in v_passes),
                 registers=max(r.get("registers", 0) for r in rs),
                 local_bytes=max(r.get("local_bytes", 0) for r in rs),
                 spill_instr=max(r.get("spill_instr", 0) for r in rs))
        for card in CARDS:
            for k in ("mem_ms", "issue_ms", "mufu_ms", "ms"):
                t[f"{card}_{k}"] = sum(r.get(f"{card}_{k}", 0.0) for r in rs)
            if any(r.get("overlap") for r in rs):  # one kernel whose passes overlap across CTAs
                t[f"{card}_ms"] = max(t[f"{card}_mem_ms"], t[f"{card}_issue_ms"], t[f"{card}_mufu_ms"])
        out.append(t)
    return out


def bound(r: dict, card: str) -> str:
    return "memory" if r[f"{card}_mem_ms"] >= max(r[f"{card}_issue_ms"], r[f"{card}_mufu_ms"]) \
        else ("MUFU" if r[f"{card}_mufu_ms"] > r[f"{card}_issue_ms"] else "issue")


def write_csv(rows: List[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def summary_table(rows: List[dict], cap: int = 90, dtype: str = "bf16") -> str:
    """Markdown table of the training steps (TOTAL rows) for one target and dtype."""
    lines = ["| impl | div | mode | passes | bytes/elem | SASS/elem | MUFU/elem | BAR/elem | "
             "SHFL/elem | H100 ms | H100 bound | H200 ms | H200 bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("loop") != "TOTAL" or r["cap"] != cap or r["dtype"] != dtype:
            continue
        lines.append(f"| {r['impl']} {r['op'] if r['op'] != 'kd_loss' else ''} | {r['div']} | "
                     f"{r['mode']} | {r['n_loops']} | {r['bytes_per_elem']:.1f} | "
                     f"{r['sass_per_elem']:.1f} | {r['mufu_per_elem']:.2f} | "
                     f"{r['bar_per_elem']:.3f} | {r['shfl_per_elem']:.3f} | {r['H100_ms']:.2f} | "
                     f"{_step_bound(rows, r, 'H100')} | {r['H200_ms']:.2f} | "
                     f"{_step_bound(rows, r, 'H200')} |")
    return "\n".join(lines)


def _step_bound(rows, total_row, card) -> str:
    keys = ("impl", "op", "cap", "dtype", "div", "mode")
    bounds = [bound(r, card) for r in rows if r.get("loop") not in ("TOTAL", "rest")
              and r.get("extent") == MODEL_V and all(r[k] == total_row[k] for k in keys)]
    return "/".join(b[0] if b != "MUFU" else "U" for b in bounds)  # m = memory, i = issue


def plot(rows: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # pragma: no cover
        return f"matplotlib missing ({e}); no plot"
    tot = [r for r in rows if r.get("loop") == "TOTAL" and r["cap"] == 90 and r["dtype"] == "bf16"
           and r["op"] == "kd_loss" and r["mode"] in ("labels", "hard")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, card in zip(axes, CARDS):
        labels, mem, issue, pred = [], [], [], []
        for r in sorted(tot, key=lambda r: (DIV_NAMES.index(r["div"]), r["mode"], r["impl"])):
            labels.append(f"{r['impl'][0]}:{r['div']}{'+h' if r['mode'] == 'hard' else ''}")
            mem.append(r[f"{card}_mem_ms"])
            issue.append(max(r[f"{card}_issue_ms"], r[f"{card}_mufu_ms"]))
            pred.append(r[f"{card}_ms"])
        x = range(len(labels))
        ax.bar([i - 0.27 for i in x], mem, 0.27, label="memory time")
        ax.bar(x, issue, 0.27, label="issue / MUFU time")
        ax.bar([i + 0.27 for i in x], pred, 0.27, label="predicted (Σ max per pass)")
        floor = 6 * MODEL_N * MODEL_V / CARDS[card]["copy_bw"] * 1e3
        ax.axhline(floor, color="k", ls=":", lw=1, label="6 B/elem floor")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=70, fontsize=7)
        ax.set_title(f"{card}, bf16, N={MODEL_N}, V={MODEL_V}, fwd+bwd (sm_90a SASS)")
        ax.set_ylabel("ms")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


DIV_CHOICES = DIV_NAMES + tuple(map(str, range(len(DIV_NAMES))))  # --divs: names or ids


def _div_id(x: str) -> int:
    return int(x) if x.isdigit() else DIV_NAMES.index(x)


def _choices(ap, flag, value, allowed, convert=str):
    """The comma-separated list ``value`` of ``flag``, each item one of ``allowed`` (argparse's
    usage error, naming the flag and the choices, otherwise), converted."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        ap.error(f"{flag}: {', '.join(bad) or 'nothing'} not among {', '.join(allowed)}")
    return list(dict.fromkeys(convert(x) for x in items))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    all_modes = [m for m, _, _ in LABEL_MODES] + ["hard_only"]
    ap.add_argument("--caps", default=",".join(map(str, CAPS)),
                    help=f"compute capabilities, comma-separated (default and choices: "
                         f"{','.join(map(str, CAPS))})")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"from {','.join(DTYPES)}")
    ap.add_argument("--divs", default=",".join(DIV_NAMES),
                    help=f"divergence names or ids, from {','.join(DIV_NAMES)}")
    ap.add_argument("--modes", default=",".join(all_modes), help=f"from {','.join(all_modes)}")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-sparse", action="store_true")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "model.csv"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines, no files")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    caps = _choices(ap, "--caps", args.caps, [str(c) for c in CAPS], int)
    dtypes = _choices(ap, "--dtypes", args.dtypes, DTYPES)
    divs = _choices(ap, "--divs", args.divs, DIV_CHOICES, _div_id)
    modes = _choices(ap, "--modes", args.modes, all_modes)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the JIT kernels must be compilable: re-run
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                              env=env).returncode
    sys.path.insert(0, ROOT)
    rows = []
    if not args.no_triton:
        rows += model_triton(triton_variants(caps, dtypes, divs, modes, not args.no_sparse),
                             args.workers)
    if not args.no_cuda:
        if shutil.which("nvcc"):
            rows += model_cuda(caps, dtypes, divs)
        else:
            print("nvcc not found: CUDA kernels skipped", file=sys.stderr)
    rows += totals(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    write_csv(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} rows)")
    if not args.no_plot:
        note = plot(rows, os.path.splitext(args.out)[0] + ".png")
        print(note or f"wrote {os.path.splitext(args.out)[0]}.png")
    for cap in caps:
        if "bf16" in dtypes:
            print(f"\nsm_{cap}, bf16, training step (forward + backward), N={MODEL_N}, V={MODEL_V}")
            print(summary_table(rows, cap, "bf16"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
