"""``python -m kdkernels bench``: forward+backward benchmarks of every KD-loss implementation.

All implementations run side by side in one process on the same inputs, one shape at a time:

``eager``
    ``kdkernels.tools.eager.eager_kd_loss``: the DESIGN.md §2 formula on the full [N, V] tensors with
    plain autograd, i.e. what a user writes without this library.
``compile``
    ``torch.compile`` of that same function. Its first call on each shape (compilation, or a
    recompilation) is timed separately and reported as ``first_call_s``; it never enters the
    steady-state statistics.
``liger``
    Liger Kernel, when ``liger_kernel`` is importable and the tensors are on a CUDA GPU (its losses
    are Triton GPU kernels). Its losses take log-probabilities (probabilities for TVD), so the timed
    path includes ``log_softmax(x.float() / T)`` of both inputs: the upcast to fp32 is what keeps its
    bf16 results within tolerance of the reference, and it is part of its cost. Divergences:
    forward_kl (``LigerKLDIVLoss``), jsd (``LigerJSD``), tvd (``LigerTVDLoss``); the others have
    no Liger equivalent and are skipped with that reason.
``kd-<backend>``
    ``kdkernels.kd_loss(..., backend=<backend>)`` for every backend that ``kdkernels.backends``
    reports available for the device and dtype (never the Triton interpreter on CPU tensors).

Every implementation computes the batch-mean loss ``T² · D(p, q)`` (T = 2 by default, no labels)
of student logits ``s`` [N, V] against teacher logits ``t`` [N, V].

What is measured, per implementation and shape
-----------------------------------------------
time_s
    Wall time of one training step of the loss: ``x = s.detach().requires_grad_(); loss = f(x, t);
    loss.backward()``. The gradient is allocated by ``backward`` inside the timed region, as in
    training. After ``--warmup`` untimed calls, ``--repeats`` timed calls give median, p20 and p80.
    GPU: CUDA events around the step; CPU: ``perf_counter``.
first_call_s
    The very first call on that shape (includes compilation and JIT for compile/Triton/Liger).
peak_extra_bytes
    GPU: ``torch.cuda.max_memory_allocated()`` during one step minus the allocated bytes just before
    it (the inputs, and everything else that exists before the step, are excluded).
    CPU: CPU allocators keep freed memory, and a process's peak RSS only ever grows, so the number
    comes from a FRESH subprocess per implementation and shape. It builds the same inputs, runs one
    untimed step (one-time costs such as compilation are not memory a training step needs), frees
    it, returns freed heap memory to the kernel (``malloc_trim(0)``), resets the kernel's RSS
    high-water mark (``echo 5 > /proc/self/clear_refs``) and reads its RSS; then it runs one step
    and reads the high-water mark (``VmHWM``). The difference is the memory the step touched beyond
    the inputs and the loaded code: the gradient and every temporary, as the kernel counts them.
    Where ``/proc/self/clear_refs`` is not writable the number is not reported (never guessed).
loss_err, grad_err
    ``|loss − loss_ref| / max(|loss_ref|, 1e-6)`` and ``max |g − g_ref| / max |g_ref|`` against
    ``kd_loss(..., backend="reference")`` on the same inputs (the whole gradient up to 2²⁶
    elements; above that, 512 evenly spaced rows including the last, so the reference stays
    affordable; the loss is always compared over all rows). An implementation whose error exceeds
    ``TOLERANCE[dtype]`` (or whose result holds NaN where the reference has none) is REFUSED: it is
    reported as failed with the reason, and no time or memory row is written for it, so it appears
    in no plot and no ratio.
GBps, pct_copy (GPU only)
    Achieved bandwidth of the byte model of DESIGN.md §3: forward reads s and t, backward reads s
    and t and writes the gradient, so one step moves ``5 · e`` bytes per element for an element
    size ``e``: 10 B/elem for bf16 and fp16, 20 B/elem for fp32. ``pct_copy`` compares it to the
    device-to-device copy rate measured once per run (``copy_GBps`` of ``device_copy``: a 1 GiB
    ``copy_``, counting the bytes read and written).

Output: a table (ratios against eager), ``results.csv`` with one row per (implementation, shape,
metric), PNG plots drawn from the CSV (``kdkernels.tools.plotting``), and ``table.txt``.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .. import __version__, backends
from .. import divergences as D
from .memory_probe import proc_status_kib

__all__ = ["Problem", "Impl", "register_impl", "unregister_impl", "implementations", "TOLERANCE",
           "CSV_COLUMNS", "sweep", "run_bench", "add_bench_arguments"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Refusal threshold on the relative loss and gradient errors against the reference backend.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
CSV_COLUMNS = ["implementation", "device", "card", "dtype", "N", "V", "metric", "median", "p20",
               "p80", "versions", "date", "divergence", "note"]
CPU_DEFAULT = {"N": [256], "V": [32000], "dtype": ["float32"], "repeats": 5}
GPU_DEFAULT = {"N": [1024, 4096, 8192], "V": [32000, 128256, 151936, 262144],
               "dtype": ["bfloat16", "float32"], "repeats": 10}


@dataclass(frozen=True)
class Problem:
    divergence: str
    dtype: str
    N: int
    V: int
    device: str
    temperature: float = 2.0
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def inputs(self):
        """Student and teacher logits, generated on the device (same seed, same tensors)."""
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.N * 7919 + self.V)
        kw = dict(generator=g, device=self.device, dtype=self.torch_dtype)
        s = torch.randn(self.N, self.V, **kw).mul_(2.0)
        t = torch.randn(self.N, self.V, **kw).mul_(2.0)
        return s, t


@dataclass(frozen=True)
class Impl:
    """One benchmarked implementation.

    ``build(problem)`` returns ``f(student, teacher) -> scalar loss`` (differentiable w.r.t. the
    student). ``unavailable(problem)`` returns None, or why it cannot run that problem.
    """
    name: str
    build: Callable[[Problem], Callable]
    unavailable: Callable[[Problem], Optional[str]] = lambda p: None


# ---- the built-in implementations -----------------------------------------------------------

def _eager_build(p: Problem):
    from .eager import eager_kd_loss
    return functools.partial(eager_kd_loss, divergence=p.divergence, temperature=p.temperature)


@functools.lru_cache(maxsize=None)
def _compiled(divergence: str, temperature: float):
    # One compiled function per (divergence, T), shared by all shapes, so shape changes are the
    # recompilations a user would see (and are timed as first calls).
    from .eager import eager_kd_loss
    return torch.compile(functools.partial(eager_kd_loss, divergence=divergence,
                                           temperature=temperature))


def _compile_build(p: Problem):
    return _compiled(p.divergence, p.temperature)


def _liger_unavailable(p: Problem) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed (pip install liger-kernel)"
    if p.divergence not in _LIGER_DIVERGENCES:
        return f"Liger Kernel has no {p.divergence} loss (it has {', '.join(_LIGER_DIVERGENCES)})"
    if not p.device.startswith("cuda"):
        return "Liger Kernel runs on CUDA GPUs only (Triton kernels)"
    return None


_LIGER_DIVERGENCES = ("forward_kl", "jsd", "tvd")


def liger_loss_fn(divergence: str, temperature: float, kl_cls=None, jsd_cls=None, tvd_cls=None):
    """The Liger path for ``divergence``: log-probabilities (probabilities for TVD) of the fp32
    upcast, Liger's batch-mean loss, times T². The loss classes can be passed in (tests)."""
    T = float(temperature)
    div = D.get(divergence)

    def up(x):  # bf16/fp16 -> fp32; fp32 and float64 stay as they are
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    if divergence == "forward_kl":
        if kl_cls is None:
            from liger_kernel.transformers import LigerKLDIVLoss as kl_cls
        crit = kl_cls(reduction="batchmean", log_target=True)
        # kl_div(input=log q, target=log p) = KL(p || q): the forward KL
        return lambda s, t: (T * T) * crit(torch.log_softmax(up(s) / T, -1),
                                           torch.log_softmax(up(t) / T, -1))
    if divergence == "jsd":
        if jsd_cls is None:
            from liger_kernel.transformers import LigerJSD as jsd_cls
        # LigerJSD(beta) = beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q, P the teacher
        crit = jsd_cls(beta=div.default)
        return lambda s, t: (T * T) * crit(torch.log_softmax(up(s) / T, -1),
                                           torch.log_softmax(up(t) / T, -1))
    if divergence == "tvd":
        if tvd_cls is None:
            from liger_kernel.transformers.tvd import LigerTVDLoss as tvd_cls
        crit = tvd_cls(reduction="batchmean")
        return lambda s, t: (T * T) * crit(torch.softmax(up(s) / T, -1),
                                           torch.softmax(up(t) / T, -1))
    raise ValueError(f"no Liger equivalent for divergence={divergence!r}")


def _liger_build(p: Problem):
    return liger_loss_fn(p.divergence, p.temperature)


def _backend_unavailable(name: str) -> Callable[[Problem], Optional[str]]:
    def unavailable(p: Problem) -> Optional[str]:
        spec = backends.BACKENDS[name]
        dev = torch.device(p.device).type
        if dev not in spec.devices:
            return f"backend {name!r} does not run on {dev}"
        if p.torch_dtype not in spec.dtypes:
            return f"backend {name!r} does not accept {p.dtype}"
        if name == "triton" and dev == "cpu":
            return "the Triton interpreter is a test tool, not benchmarked"
        return backends.availability(name)
    return unavailable


def _backend_build(name: str) -> Callable[[Problem], Callable]:
    def build(p: Problem):
        from ..losses.kd import kd_loss
        return functools.partial(kd_loss, divergence=p.divergence, temperature=p.temperature,
                                 backend=name)
    return build


def implementations() -> Dict[str, Impl]:
    """Every known implementation by name, in the order they are run and shown."""
    impls = [Impl("eager", _eager_build), Impl("compile", _compile_build),
             Impl("liger", _liger_build, _liger_unavailable)]
    impls += [Impl(f"kd-{n}", _backend_build(n), _backend_unavailable(n)) for n in backends.names()]
    return {i.name: i for i in impls}


# ---- machine description --------------------------------------------------------------------

def card_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
        if m:
            model = m.group(1).strip()
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> str:
    out = [f"kdkernels={__version__}", f"torch={torch.__version__}",
           f"python={platform.python_version()}"]
    for mod in ("triton", "liger_kernel"):
        try:
            out.append(f"{mod}={importlib.import_module(mod).__version__}")
        except Exception:
            out.append(f"{mod}=none")
    if torch.version.cuda:
        out.append(f"cuda={torch.version.cuda}")
    return " ".join(out)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


# ---- one step, timing, errors ---------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(fn, s, t):
    x = s.detach().requires_grad_(True)
    loss = fn(x, t)
    loss.backward()
    return loss.detach(), x.grad


def _timed_step(fn, s, t, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(fn, s, t)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    _step(fn, s, t)
    return time.perf_counter() - t0


def _quantiles(xs: List[float]):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(xs), q[1], q[7]


def _rel_errors(loss, grad, ref_loss, ref_grad):
    """(loss error, gradient error) relative to the reference; inf where NaN appears wrongly."""
    lo, rl = float(loss), float(ref_loss)
    loss_err = 0.0 if (math.isnan(lo) and math.isnan(rl)) else abs(lo - rl) / max(abs(rl), 1e-6)
    if math.isnan(loss_err):
        loss_err = math.inf
    if grad is None or grad.shape != ref_grad.shape:
        return loss_err, math.inf
    worst, scale = 0.0, 0.0
    step = max(1, (1 << 24) // max(grad.shape[-1], 1))  # rows per chunk: no [N, V] fp32 temporary
    for i in range(0, grad.shape[0], step):
        g, r = grad[i:i + step].float(), ref_grad[i:i + step].float()
        if bool(torch.isnan(g).any()) and not bool(torch.isnan(r).any()):
            return loss_err, math.inf
        worst = max(worst, float((g - r).abs().nan_to_num(0.0).max()))
        scale = max(scale, float(r.abs().nan_to_num(0.0).max()))
    return loss_err, worst / max(scale, 1e-30)


# Up to this many elements the whole gradient is compared; above it, SAMPLE_ROWS evenly spaced
# rows (the first and the last included), which keeps the reference affordable at N·V ~ 2³¹.
FULL_CHECK_ELEMENTS = 1 << 26
SAMPLE_ROWS = 512


def reference_result(p: Problem, s, t):
    """(loss, rows, grad_rows) of the reference backend: ``rows`` None means all rows."""
    from ..losses.kd import kd_loss
    kw = dict(divergence=p.divergence, temperature=p.temperature, backend="reference")
    if p.N * p.V <= FULL_CHECK_ELEMENTS:
        loss, grad = _step(functools.partial(kd_loss, **kw), s, t)
        return loss, None, grad
    with torch.no_grad():  # every row's loss: forward only, chunked
        loss = kd_loss(s, t, reduction="sum", **kw) / p.N
    rows = torch.linspace(0, p.N - 1, SAMPLE_ROWS, device=s.device).round().long().unique()
    x = s[rows].detach().requires_grad_(True)
    (kd_loss(x, t[rows], reduction="sum", **kw) / p.N).backward()  # the batch-mean gradient
    return loss, rows, x.grad


def measure_copy_rate(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy rate in GB/s (bytes read + bytes written, per second)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


def bytes_per_step(p: Problem) -> int:
    """DESIGN.md §3 byte model: read s, t (forward), read s, t and write grad (backward)."""
    return 5 * torch.empty((), dtype=p.torch_dtype).element_size() * p.N * p.V


# ---- CPU memory: a fresh subprocess per implementation and shape -----------------------------

def child_main(spec_json: str) -> int:
    """Entry point of the memory subprocess; prints one JSON object on its last stdout line."""
    spec = json.loads(spec_json)
    try:
        torch.set_num_threads(int(spec["threads"]))
        p = Problem(**spec["problem"])
        impl = implementations()[spec["impl"]]
        s, t = p.inputs()
        fn = impl.build(p)
        _step(fn, s, t)  # one-time costs (compilation, lazy initialisation) are not measured
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark (VmHWM) to the current RSS
        base = proc_status_kib("VmRSS")
        out = _step(fn, s, t)
        peak = proc_status_kib("VmHWM")
        del out
        print(json.dumps({"peak_extra_bytes": (peak - base) * 1024, "base_rss_bytes": base * 1024}))
    except Exception as e:  # reported to the parent, which prints the reason
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    return 0


def cpu_peak_extra_bytes(impl: Impl, p: Problem, timeout: float = 600.0):
    """(bytes, None) or (None, reason): peak extra RSS of one step in a fresh subprocess."""
    spec = {"problem": asdict(p), "impl": impl.name, "threads": torch.get_num_threads()}
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = "import sys; from kdkernels.tools.bench import child_main; sys.exit(child_main(sys.argv[1]))"
    try:
        r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                           text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"memory subprocess timed out after {timeout:.0f} s"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return None, f"memory subprocess failed (rc={r.returncode}): {r.stderr.strip()[-300:]}"
    res = json.loads(lines[-1])
    if "error" in res:
        return None, f"memory subprocess: {res['error']}"
    return int(res["peak_extra_bytes"]), None


def gpu_peak_extra_bytes(fn, s, t, device: str) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = _step(fn, s, t)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - base


# ---- the run --------------------------------------------------------------------------------

@dataclass
class Result:
    impl: str
    problem: Problem
    status: str = "ok"          # ok | failed | skipped
    note: str = ""
    times: List[float] = field(default_factory=list)
    first_call: Optional[float] = None
    peak_extra: Optional[int] = None
    loss_err: Optional[float] = None
    grad_err: Optional[float] = None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


def _run_one(impl: Impl, p: Problem, s, t, ref, args) -> Result:
    res = Result(impl.name, p)
    fn = impl.build(p)
    _sync(p.device)
    t0 = time.perf_counter()
    loss, grad = _step(fn, s, t)
    _sync(p.device)
    res.first_call = time.perf_counter() - t0
    ref_loss, rows, ref_grad = ref
    if rows is not None and grad is not None and grad.shape == s.shape:
        grad = grad[rows]
    res.loss_err, res.grad_err = _rel_errors(loss, grad, ref_loss, ref_grad)
    del loss, grad
    tol = TOLERANCE[p.dtype]
    if not (res.loss_err <= tol and res.grad_err <= tol):
        res.status = "failed"
        res.note = (f"REFUSED: disagrees with the reference (loss error {res.loss_err:.2e}, "
                    f"gradient error {res.grad_err:.2e}, tolerance {tol:.0e})")
        return res
    for _ in range(max(0, args.warmup - 1)):
        _step(fn, s, t)
    # Fewer repeats where one step is slow, so the sweep keeps to its budget.
    est = _timed_step(fn, s, t, p.device)
    n = args.repeats
    if args.case_seconds and est > 0:
        n = max(min(3, args.repeats), min(args.repeats, int(args.case_seconds / est)))
    res.times = [est] + [_timed_step(fn, s, t, p.device) for _ in range(n - 1)]
    if args.memory and p.device.startswith("cuda"):
        res.peak_extra = gpu_peak_extra_bytes(fn, s, t, p.device)
    return res


def _problems(args) -> List[Problem]:
    out = []
    for div in args.divergence:
        for dt in args.dtype:
            for V in args.V:
                for N in args.N:
                    out.append(Problem(div, dt, N, V, args.device, args.temperature, args.seed))
    return out


def _free_bytes(device: str) -> Optional[int]:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return None


def sweep(args, on_progress: Optional[Callable[[List[Result]], None]] = None) -> List[Result]:
    """Run the sweep described by the parsed ``args``; returns one Result per (shape, impl).

    ``on_progress(results_so_far)`` is called after each shape (the CLI rewrites its CSV there, so
    a run killed by an outer timeout still leaves every finished shape on disk)."""
    from .progress import progress

    impls = implementations()
    chosen = [impls[n] for n in (args.impl or list(impls))]
    problems = _problems(args)
    results: List[Result] = []
    deadline = time.perf_counter() + args.time_budget if args.time_budget else None
    bar = progress(total=len(problems) * len(chosen), desc="bench", unit="case", file=sys.stderr,
               disable=args.quiet or None)
    for p in problems:
        bar.set_postfix_str(f"{p.divergence} {p.dtype} N={p.N} V={p.V}")
        free = _free_bytes(p.device)
        need = 2 * p.N * p.V * p.torch_dtype.itemsize  # s and t
        if deadline is not None and time.perf_counter() > deadline:
            skip = f"time budget of {args.time_budget:.0f} s spent"
        elif free is not None and need > 0.9 * free:
            skip = f"inputs and reference need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        else:
            skip = None
        ref = None
        if skip is None:
            try:
                s, t = p.inputs()
                ref = reference_result(p, s, t)
            except Exception as e:
                if not _is_oom(e):
                    raise
                skip = f"out of memory creating the inputs or the reference ({type(e).__name__})"
                s = t = ref = None
                gc.collect()
                if p.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        for impl in chosen:
            res = Result(impl.name, p)
            reason = skip or impl.unavailable(p)
            if reason is None and deadline is not None and time.perf_counter() > deadline:
                reason = f"time budget of {args.time_budget:.0f} s spent"
            if reason:
                res.status, res.note = "skipped", reason
            else:
                try:
                    res = _run_one(impl, p, s, t, ref, args)
                except Exception as e:
                    msg = str(e).splitlines()[0][:200] if str(e) else ""
                    if _is_oom(e):  # a result, not a failure: this shape does not fit
                        res.status, res.note = "skipped", f"out of memory: {msg}"
                    else:
                        res.status, res.note = "failed", f"error: {type(e).__name__}: {msg}"
                gc.collect()
                if p.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                if res.status == "ok" and args.memory and not p.device.startswith("cuda"):
                    res.peak_extra, why = cpu_peak_extra_bytes(impl, p)
                    if why:
                        res.note = why
            results.append(res)
            bar.update(1)
        s = t = ref = None
        gc.collect()
        if p.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if on_progress is not None:
            on_progress(results)
    bar.close()
    return results


# ---- output: CSV, table ---------------------------------------------------------------------

def csv_rows(results: List[Result], device: str, card: str, vers: str, date: str,
             copy_rate: Optional[float]) -> List[dict]:
    rows = []

    def row(r: Result, metric, median, p20="", p80="", note=""):
        rows.append({"implementation": r.impl, "device": device, "card": card,
                     "dtype": r.problem.dtype, "N": r.problem.N, "V": r.problem.V,
                     "metric": metric, "median": median, "p20": p20, "p80": p80,
                     "versions": vers, "date": date, "divergence": r.problem.divergence,
                     "note": note})

    if copy_rate is not None:
        rows.append({"implementation": "device_copy", "device": device, "card": card, "dtype": "",
                     "N": "", "V": "", "metric": "copy_GBps", "median": f"{copy_rate:.1f}",
                     "p20": "", "p80": "", "versions": vers, "date": date, "divergence": "",
                     "note": "1 GiB copy_, read + write bytes"})
    for r in results:
        if r.status != "ok":
            row(r, r.status, "", note=r.note)
            continue
        med, p20, p80 = _quantiles(r.times)
        row(r, "time_s", f"{med:.6g}", f"{p20:.6g}", f"{p80:.6g}", note=f"{len(r.times)} repeats")
        row(r, "first_call_s", f"{r.first_call:.6g}")
        if r.peak_extra is not None:
            row(r, "peak_extra_bytes", str(r.peak_extra))
        elif r.note:
            row(r, "peak_extra_bytes", "", note=r.note)
        row(r, "loss_err", f"{r.loss_err:.3e}")
        row(r, "grad_err", f"{r.grad_err:.3e}")
        if copy_rate is not None:
            b = bytes_per_step(r.problem)
            row(r, "GBps", f"{b / med / 1e9:.1f}", f"{b / p80 / 1e9:.1f}", f"{b / p20 / 1e9:.1f}",
                note=f"{b / (r.problem.N * r.problem.V):.0f} B/elem model")
            row(r, "pct_copy", f"{100 * b / med / 1e9 / copy_rate:.1f}")
    return rows


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def format_table(results: List[Result], copy_rate: Optional[float]) -> str:
    lines = []
    groups: Dict[Problem, List[Result]] = {}
    for r in results:
        groups.setdefault(r.problem, []).append(r)
    hdr = (f"{'implementation':<14} {'median ms':>10} {'p20-p80 ms':>17} {'speedup':>8} "
           f"{'1st call s':>10} {'peak MiB':>9} {'mem/eager':>9} {'loss err':>9} {'grad err':>9}")
    if copy_rate is not None:
        hdr += f" {'GB/s':>7} {'%copy':>6}"
    notes = []
    for p, rs in groups.items():
        lines.append(f"\n{p.divergence}  {p.dtype}  N={p.N}  V={p.V}  T={p.temperature:g}  "
                     f"({p.device})")
        lines.append(hdr)
        eager = next((r for r in rs if r.impl == "eager" and r.status == "ok"), None)
        e_med = _quantiles(eager.times)[0] if eager else None
        for r in rs:
            if r.status != "ok":
                notes.append(f"  {r.impl} @ {p.divergence} {p.dtype} N={p.N} V={p.V}: "
                             f"{r.status}: {r.note}")
                if r.status == "failed":
                    lines.append(f"{r.impl:<14} {'FAILED (see below)':>28}")
                continue
            med, p20, p80 = _quantiles(r.times)
            mem = f"{r.peak_extra / 2**20:9.1f}" if r.peak_extra is not None else f"{'n/a':>9}"
            mem_ratio = (f"{r.peak_extra / eager.peak_extra:8.2f}x"
                         if eager and r.peak_extra is not None and eager.peak_extra else f"{'':>9}")
            line = (f"{r.impl:<14} {1e3 * med:>10.2f} {1e3 * p20:>8.2f}-{1e3 * p80:<8.2f} "
                    f"{(e_med / med if e_med else float('nan')):>7.2f}x {r.first_call:>10.2f} "
                    f"{mem} {mem_ratio} {r.loss_err:>9.1e} {r.grad_err:>9.1e}")
            if copy_rate is not None:
                gbps = bytes_per_step(p) / med / 1e9
                line += f" {gbps:>7.0f} {100 * gbps / copy_rate:>5.1f}%"
            lines.append(line)
            if r.note:
                notes.append(f"  {r.impl} @ N={p.N} V={p.V}: {r.note}")
    out = "\n".join(lines)
    if copy_rate is not None:
        out = f"device-to-device copy: {copy_rate:.0f} GB/s (measured)" + out
    out += ("\n\nspeedup = eager median / median; mem/eager = peak extra memory / eager's; "
            "errors are relative to the reference backend.")
    if notes:
        out += "\n\nnot reported:\n" + "\n".join(dict.fromkeys(notes))
    return out


# ---- CLI ------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Time forward+backward of every KD-loss implementation side by side. CPU "
                     f"default: N={CPU_DEFAULT['N']} V={CPU_DEFAULT['V']} float32 (about a minute); "
                     f"GPU default: N={GPU_DEFAULT['N']} V={GPU_DEFAULT['V']} bf16 and fp32.")
    p.add_argument("--divergence", nargs="+", default=["forward_kl"], choices=D.kernel_names(),
                   help="divergence(s), default forward_kl")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None,
                   help="input dtype(s); default float32 on CPU, bfloat16 and float32 on GPU")
    p.add_argument("--N", nargs="+", type=_positive_int, default=None, help="rows (tokens)")
    p.add_argument("--V", nargs="+", type=_positive_int, default=None, help="vocabulary sizes")
    p.add_argument("--device", default=None, help="cpu or cuda[:i]; default cuda when present")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed steps per case (default 5 on CPU, 10 on GPU)")
    p.add_argument("--warmup", type=_positive_int, default=1,
                   help="untimed steps before timing, the first call included (default 1)")
    p.add_argument("--case-seconds", type=_nonneg_float, default=None,
                   help="cut repeats (to no fewer than 3) when a case would take longer than this")
    p.add_argument("--time-budget", type=_nonneg_float, default=None,
                   help="seconds; cases left when it is spent are skipped (and reported)")
    p.add_argument("--temperature", type=float, default=2.0, help="T (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", nargs="+", default=None, metavar="NAME",
                   help="only these implementations (eager, compile, liger, kd-<backend>, ...)")
    p.add_argument("--out", default=None,
                   help="output folder (default bench_results/<card>-<date>)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip peak-memory measurement (on CPU it costs a subprocess per case)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _finish_args(args) -> None:
    """Defaults that depend on the device, and checks argparse cannot do."""
    def bad(msg):
        raise SystemExit(f"python -m kdkernels bench: error: {msg}")

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        bad(f"--device: unknown device {args.device!r} (expected cpu or cuda[:i])")
    if dev.type not in ("cpu", "cuda"):
        bad(f"--device: {args.device!r} is not benchmarked (expected cpu or cuda[:i])")
    if dev.type == "cuda" and not torch.cuda.is_available():
        bad("--device cuda: no CUDA GPU is available here")
    args.device = str(dev)
    defaults = GPU_DEFAULT if dev.type == "cuda" else CPU_DEFAULT
    for key in ("N", "V", "dtype", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        bad(f"--temperature must be > 0, got {args.temperature}")
    known = list(implementations())
    if args.impl:
        unknown = [n for n in args.impl if n not in known]
        if unknown:
            bad(f"--impl: unknown implementation(s) {unknown}; known: {known}")
        args.impl = list(dict.fromkeys(args.impl))


def run_bench(args) -> int:
    """``python -m kdkernels bench``: exit status 1 when an implementation failed or was refused."""
    _finish_args(args)
    card = card_name(args.device)
    now = datetime.datetime.now(datetime.timezone.utc)
    date = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = args.out or os.path.join("bench_results", f"{slug(card)}-{now:%Y-%m-%d}")
    os.makedirs(out, exist_ok=True)
    copy_rate = measure_copy_rate(args.device) if args.device.startswith("cuda") else None
    vers = versions()
    print(f"kdkernels bench on {card}: {vers}", flush=True)
    csv_path = os.path.join(out, "results.csv")

    def save(results):
        write_csv(csv_rows(results, args.device, card, vers, date, copy_rate), csv_path)

    results = sweep(args, on_progress=save)
    table = format_table(results, copy_rate)
    print(table)
    save(results)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(f"{card} | {date} | {vers}\ncommand: python -m kdkernels bench "
                f"{' '.join(sys.argv[2:]) if len(sys.argv) > 2 else ''}\n{table}\n")
    written = [csv_path, os.path.join(out, "table.txt")]
    if args.plots:
        from .plotting import plot_csv
        written += plot_csv(csv_path, out)
    print("\nwrote " + ", ".join(written))
    return 1 if any(r.status == "failed" for r in results) else 0

