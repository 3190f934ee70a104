"""The backend table: which implementations exist, where they run, what they can do, and why
one is unavailable. Every op family (dense rows, sparse top-k statistics, fused linear) chooses
its backend here, with ``choose``.

Every kernel backend is one module implementing the kernel contract:

``forward_rows(student, teacher, labels, div_id, param, temperature, soft_weight, hard_weight,
ignore_index) -> (loss [N], stats [N, STATS_WIDTH])``
    ``student`` is a [B, L, V] view with unit column stride and any row strides (B·L = N rows);
    ``teacher`` is a [B, L, Vt >= V] view of the same kind (columns >= V are ignored);
    ``labels`` is None or an int64 [N] tensor (any stride). ``loss`` is per-row
    soft_weight·T²·D + hard_weight·CE in fp32 (float64 for float64 inputs), 0 on ignored rows.
    ``stats`` is per-row fp32 state handed to backward. For ``logit_mse`` (div_id 6, no
    temperature) it is (μ, n, −μ, n, 0, max s, log Σ e^(s − max s)): μ = mean(t − s) over the n
    columns not −inf in both, then the hard term's statistics as the other divergences store
    them; backward reads μ and n from columns 0 and 1 only, so the row with columns (0, 1) and
    (2, 3) swapped, given to backward with teacher and student exchanged (and hard_weight = 0),
    yields the gradient with respect to the teacher.
``backward_rows(grad_loss [N], student, teacher, labels, stats, <same scalars>, out=None) -> grad``
    The gradient of Σ grad_loss[i]·loss[i] w.r.t. ``student``, a new contiguous [B, L, V] tensor in
    the student's dtype (or ``out``, for backends with "grad_inplace"); exactly zero on ignored
    rows.
``forward_rows_with_grad(<forward args>, grad_scale) -> (loss [N], grad)``  ("fused_grad")
    The losses and the gradient for grad_loss = grad_scale in one call (statistics pass, then one
    pass forming loss and gradient).
``forward_rows_given_stats(student, teacher, labels, stats, div_id, param, temperature,
ignore_index) -> partial [N, 2]``  ("vocab_parallel")
    The vocab-parallel pass with the GLOBAL statistics: ``stats`` is [N, STATS_WIDTH] fp32 in this
    backend's own layout (``forward_rows``), of which only the normalisers (columns 0..3: max and
    log sum-exp of t/T and of s/T) are read; per row, ``partial`` (fp32) holds Σφ and the partial
    c = Σ q·∂φ/∂q over the columns of ``student`` (a V-shard), with log p and log q formed from
    the given normalisers exactly as this backend's forward forms them (same centring), and in
    this backend's convention for c (``BackendSpec.c_full``); zeros on ignored rows. Summed over
    the shards they are the full row's D and c (``kdkernels.distributed.vocab_parallel``).
    Not for ``logit_mse`` (div_id 6; ``check_given_stats_div`` raises).
    With "vocab_parallel", ``backward_rows`` also takes a label outside [0, V) that is not
    ignore_index (the label's column lives on another rank): it adds hard_weight·softmax(s) with
    no one-hot term (``forward_rows`` gives such a row a NaN loss).
``rescale_rows_(grad, grad_loss, grad_scale) -> grad``  ("grad_rescale")
    In place: grad rows times grad_loss / grad_scale (0 where grad_scale is 0), rows whose ratio
    is exactly 1 untouched, decided on the device (no host synchronisation).
``forward_rows_ensemble(student, teachers, weights, labels, div_id, param, temperature,
soft_weight, hard_weight, ignore_index) -> (loss [N], stats [N, ensemble_stats_width(M)])``
    ("ensemble") ``forward_rows`` against the target p = Σ_m w_m softmax(t_m / T):
    ``teachers`` a list of M [B_m, L_m, Vt >= V] views (each of the teacher's kind above),
    ``weights`` M floats >= 0 summing to 1; the caller drops teachers of weight 0 (a backend
    accepts them too: they take no part). Stats columns 0..6 as the single teacher's
    (``STATS_WIDTH``) with teacher 0's (max of t_0, log sum-exp of (t_0 − max)/T) in columns
    0..1 and c = Σ q g of the ensemble target in column 4, then the same pair for t_m,
    m = 1..M−1, in columns 7 + 2(m − 1) and 8 + 2(m − 1) (maxima in raw logit units).
``backward_rows_ensemble(grad_loss, student, teachers, weights, labels, stats, <same scalars>)
-> grad`` and ``forward_rows_ensemble_with_grad(<forward args>, grad_scale) -> (loss, grad)``
    ("ensemble"; the second with "fused_grad") as ``backward_rows`` and ``forward_rows_with_grad``.
    The teachers get no gradient ("teacher_grad" with ensembles is the reference's).
``sparse_stats(s3, idx, labels, T, need_b, need_a) -> (stats [N, 3], gathered [N, K])`` and
``sparse_grad(s3, stats, idx, labels, T, need_b, need_a, c_b, c_a, g_idx, g_lab) -> grad``
    ("sparse") The student side of ``sparse_kd_loss`` (see ``kdkernels.ops.sparse``).

Kernels never reduce over rows; reductions live in ``kdkernels.reduction``. The ``reference``
backend is plain differentiable PyTorch (``reference.loss_rows``) for the dense rows and needs no
custom op; it implements every feature and is the oracle the kernels are tested against.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .triton import INTERPRETER_HINT, interpreting

__all__ = ["BACKENDS", "FEATURES", "STATS_WIDTH", "BackendSpec", "availability", "load", "choose",
           "names", "has", "rows_outputs_like", "with_grad_by_two_kernels", "check_given_stats_div",
           "ensemble_with_grad_by_two_kernels",
           "ensemble_stats_width"]

# Per-row fp32 statistics of the dense kernels: (max, log sum-exp) of t/T and of s/T, c = Σ q g,
# (max, log sum-exp) of s. The C++ extension reports its own width (checked in the tests).
STATS_WIDTH = 7


def ensemble_stats_width(n_teachers: int) -> int:
    """Columns of the ensemble kernels' stats (``forward_rows_ensemble``): STATS_WIDTH, then the
    (max, log sum-exp) pairs of teachers 1..M−1."""
    return STATS_WIDTH + 2 * (n_teachers - 1)

# Capabilities beyond forward_rows / backward_rows. A call that needs one runs only on a backend
# listing it: backend="auto" skips the others, an explicit backend without it is an error.
#   "logit_mse"    the logit_mse divergence (divergences.DIVERGENCES[...].feature)
#   "ensemble"     several teachers, p = sum_m w_m softmax(t_m / T)
#   "teacher_grad" the gradient with respect to the teacher logits (online/mutual distillation);
#                  the kernel backends run it as backward_rows of the exchanged divergence with
#                  the logits swapped (ops.dense.teacher_grad), so it needs "vocab_parallel"
#   "sparse"       sparse_stats / sparse_grad (sparse_kd_loss)
#   "vocab_parallel" forward_rows_given_stats and out-of-shard labels in backward_rows
#                  (kd_loss / fused_linear_kd_loss with process_group)
# Capabilities a call uses when present and does without otherwise (never in ``needs``):
#   "fused_grad"   forward_rows_with_grad (loss and gradient in one call)
#   "grad_inplace" backward_rows(..., out=student) (no [N, V] gradient buffer)
#   "grad_rescale" rescale_rows_(grad, grad_loss, grad_scale): in place, on the device, rows whose
#                  ratio is 1 untouched (the fused gradient handed on without a host sync)
FEATURES = frozenset({"logit_mse", "ensemble", "teacher_grad", "sparse", "vocab_parallel"})
OPTIONAL = frozenset({"fused_grad", "grad_inplace", "grad_rescale"})

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str                         # import path of the module implementing the contract
    devices: Tuple[str, ...]            # device types it runs on
    dtypes: Tuple[torch.dtype, ...]     # input dtypes it accepts
    probe: Optional[Callable[[], Optional[str]]] = None  # returns a reason when unavailable
    features: frozenset = frozenset()   # capabilities it implements (FEATURES and OPTIONAL)
    # The layout of the dense stats, as the vocab-parallel merges need it (the maxima are of the
    # raw logits t and s on every backend: log p = (t - m)/T - lz): whether c = Σ q g includes the constant parts of g (the "+1" of reverse KL; the Triton
    # kernels leave them out); whether the reverse-KL backward re-sums its c over the columns it
    # sees (the C++ kernels) instead of reading the c of the stats.
    c_full: bool = True
    resums_reverse_kl_c: bool = False


def _probe_triton() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available() and not interpreting():
        return f"no CUDA GPU ({INTERPRETER_HINT})"
    return None


def _probe_compiled(device: str) -> Callable[[], Optional[str]]:
    def probe() -> Optional[str]:
        try:
            from . import compiled
        except Exception as e:
            return f"the compiled extension could not be loaded ({type(e).__name__}: {e})"
        return compiled.unavailable_reason(device)
    return probe


BACKENDS = {
    b.name: b
    for b in (
        BackendSpec("reference", "kdkernels.backends.reference",
                    ("cpu", "cuda", "mps", "xpu", "meta"), _FLOATS + (torch.float64,),
                    features=FEATURES),
        BackendSpec("triton", "kdkernels.backends.triton.launch", ("cuda", "cpu"), _FLOATS,
                    _probe_triton,
                    features=frozenset({"sparse", "grad_inplace", "vocab_parallel", "fused_grad",
                                        "grad_rescale", "teacher_grad", "logit_mse", "ensemble"}),
                    c_full=False),
        BackendSpec("cuda", "kdkernels.backends.compiled", ("cuda",), _FLOATS,
                    _probe_compiled("cuda"),
                    features=frozenset({"vocab_parallel", "fused_grad", "grad_rescale",
                                        "teacher_grad", "logit_mse", "ensemble"}),
                    resums_reverse_kl_c=True),
        BackendSpec("cpu", "kdkernels.backends.compiled", ("cpu",), _FLOATS,
                    _probe_compiled("cpu"),
                    features=frozenset({"sparse", "fused_grad", "vocab_parallel",
                                        "teacher_grad", "logit_mse", "ensemble"}),
                    resums_reverse_kl_c=True),
    )
}
# backend="auto": first available in this order for the tensors' device type
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def names() -> list:
    return list(BACKENDS)


@torch.compiler.assume_constant_result
def has(name: str, feature: str) -> bool:
    """True when backend ``name`` implements ``feature`` (a constant for torch.compile)."""
    return feature in BACKENDS[name].features


def check_given_stats_div(div_id: int, backend: str) -> None:
    """``forward_rows_given_stats`` (the vocab-parallel pass) exists for the softmax divergences
    only: raise a clear error for ``logit_mse``, which has no normalisers to share."""
    if div_id == 6:  # divergences.LOGIT_MSE
        raise ValueError(f"backend={backend!r}: forward_rows_given_stats has no logit_mse kernel "
                         "(the vocab-parallel pass shares softmax normalisers; logit_mse has none)")


def rows_outputs_like(student: torch.Tensor, width: int = STATS_WIDTH):
    """Empty (loss [N], stats [N, width]) of the dense forward for a [B, L, V] ``student``: the
    shapes of the contract, for fake (meta) kernels."""
    n = student.shape[0] * student.shape[1]
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return (student.new_empty((n,), dtype=loss_dtype),
            student.new_empty((n, width), dtype=torch.float32))


def ensemble_with_grad_by_two_kernels(forward_rows_ensemble, backward_rows_ensemble, student,
                                      teachers, weights, labels, div_id, param, temperature,
                                      soft_weight, hard_weight, ignore_index, grad_scale):
    """``forward_rows_ensemble_with_grad`` from a backend's ensemble forward and backward kernels
    (the GPU backends have no fused ensemble kernel): (loss, G) in two launches."""
    loss, stats = forward_rows_ensemble(student, teachers, weights, labels, div_id, param,
                                        temperature, soft_weight, hard_weight, ignore_index)
    gl = grad_scale.to(torch.float32).contiguous() if grad_scale is not None \
        else torch.ones_like(loss, dtype=torch.float32)
    return loss, backward_rows_ensemble(gl, student, teachers, weights, labels, stats, div_id,
                                        param, temperature, soft_weight, hard_weight,
                                        ignore_index)


def with_grad_by_two_kernels(forward_rows, backward_rows, student, teacher, labels, div_id, param,
                             temperature, soft_weight, hard_weight, ignore_index, grad_scale):
    """``forward_rows_with_grad`` from a backend's own forward and backward kernels, for the
    divergences its fused kernel does not cover (logit_mse on the GPU backends): the same
    (loss, G) in two launches, G for grad_loss = grad_scale (ones when None)."""
    loss, stats = forward_rows(student, teacher, labels, div_id, param, temperature, soft_weight,
                               hard_weight, ignore_index)
    gl = grad_scale.to(torch.float32).contiguous() if grad_scale is not None \
        else torch.ones_like(loss, dtype=torch.float32)
    return loss, backward_rows(gl, student, teacher, labels, stats, div_id, param, temperature,
                               soft_weight, hard_weight, ignore_index)


_AVAILABILITY = {}


@torch.compiler.assume_constant_result
def availability(name: str) -> Optional[str]:
    """None if backend ``name`` can run on this machine, else the reason it cannot (cached: a
    constant for torch.compile, probed once per process)."""
    if name not in _AVAILABILITY:
        _AVAILABILITY[name] = _probe(name)
    return _AVAILABILITY[name]


def _probe(name: str) -> Optional[str]:
    spec = BACKENDS[name]
    if spec.probe is not None:
        reason = spec.probe()
        if reason:
            return reason
    try:
        importlib.import_module(spec.module)
    except Exception as e:
        return f"{spec.module} failed to import ({type(e).__name__}: {e})"
    return None


def load(name: str):
    """The module implementing backend ``name``. With KDKERNELS_CUDA_EMULATE=1, "cuda" is
    ``cuda_emulate``: CPU tensors go to the emulated kernels, CUDA tensors to the real ones."""
    if name == "cuda" and os.environ.get("KDKERNELS_CUDA_EMULATE") == "1":
        return importlib.import_module("kdkernels.backends.cuda_emulate")
    return importlib.import_module(BACKENDS[name].module)


def choose(backend: str, device: torch.device, dtype: torch.dtype,
           needs: frozenset = frozenset(), what: str = "this call") -> str:
    """Resolve ``backend`` ("auto" or a name) for tensors on ``device`` of ``dtype``.

    ``needs``: capabilities (``FEATURES``) the call requires. "auto" skips backends without them
    (ultimately the reference has all); a named backend without them is an error. ``what`` names
    the caller in messages (e.g. "sparse_kd_loss")."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    needs = frozenset(needs)
    if backend == "auto":
        if dtype == torch.float64:
            return "reference"  # kernels compute in fp32; float64 is for oracles and gradcheck
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            spec = BACKENDS[name]
            if device.type == "cpu" and name == "triton":
                continue  # never launch the interpreter unless asked for by name
            if not needs <= spec.features:
                continue  # this backend would not compute what the call asks for
            if dtype in spec.dtypes and availability(name) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; expected 'auto' or one of {names()}")
    spec = BACKENDS[backend]
    missing = sorted(needs - spec.features)
    if missing == ["sparse"]:
        raise ValueError(f"backend={backend!r} has no sparse top-k kernel; expected 'auto' or one "
                         f"of {[n for n, s in BACKENDS.items() if 'sparse' in s.features]}")
    if missing:
        have = ", ".join(sorted(spec.features & FEATURES)) or "none"
        raise ValueError(f"backend={backend!r} does not support {', '.join(missing)} (needed by "
                         f"{what}; its optional features: {have}); use backend='reference' or "
                         f"backend='auto'")
    emulated = backend == "cuda" and device.type == "cpu"  # kdkernels.backends.cuda_emulate (test tool)
    if emulated:
        importlib.import_module("kdkernels.backends.cuda_emulate").require()
    elif device.type not in spec.devices:
        raise ValueError(f"backend={backend!r} does not run on {device.type} tensors "
                         f"(it runs on: {', '.join(spec.devices)})")
    if dtype not in spec.dtypes:
        raise TypeError(f"backend={backend!r} does not accept {dtype} logits "
                        f"(it accepts: {', '.join(str(d) for d in spec.dtypes)})")
    reason = None if emulated else availability(backend)
    if reason:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend == "triton" and device.type == "cpu" and not interpreting():
        raise RuntimeError(f"backend='triton' on CPU tensors needs the interpreter: "
                           f"{INTERPRETER_HINT}")
    return backend
