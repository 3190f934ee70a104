"""The one registry of divergences.

Every backend reads this module: the integer ``id`` of a divergence is the compile-time mode of
the kernels (a Triton ``tl.constexpr``, a C++ template/switch value in ``csrc/include/kd_math.h``),
while its float parameter (β for ``jsd``, α for the skew divergences) and the temperature stay
runtime values, so a new value never triggers a recompile.

Notation for one row (one token): teacher logits t, student logits s, temperature T,
a = t/T, b = s/T, log p = log_softmax(a), log q = log_softmax(b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Divergence", "DIVERGENCES", "exchanged", "get", "resolve_param", "names", "kernel_names",
           "terms", "dphi_dlogq", "log_mix", "log_softmax_centred", "logaddexp", "xlog_ratio"]


FP32_TINY = 2.0 ** -126        # smallest normal fp32
FP32_EPS_HALF = 2.0 ** -24     # 1 - x rounds to 0 in fp32 below this


@dataclass(frozen=True)
class Divergence:
    name: str
    id: int                      # compile-time mode shared by every backend; never renumber
    formula: str                 # per-row value, for docs and error messages
    param: Optional[str] = None  # "beta" or "alpha"
    default: Optional[float] = None
    low: float = 0.0             # admissible range of the parameter
    high: float = 1.0
    low_inclusive: bool = False
    online: bool = False         # loss accumulates in the statistics pass (one read of s, t)
    hint: str = ""               # appended to range errors
    # Backend feature this divergence needs (see ``backends.FEATURES``); None for the temperature
    # divergences. Backends lacking the feature are skipped by backend="auto".
    feature: Optional[str] = None
    uses_temperature: bool = True  # False: T neither divides the logits nor scales by T²

    def check_param(self, value: Optional[float]) -> float:
        """Validate and return the parameter value (0.0 for parameter-free divergences)."""
        if self.param is None:
            return 0.0
        if value is None:
            value = self.default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{self.param} must be a float for divergence={self.name!r}, "
                            f"got {type(value).__name__}")
        value = float(value)
        lo_ok = value >= self.low if self.low_inclusive else value > self.low
        if not (math.isfinite(value) and lo_ok and value < self.high):
            lb = "[" if self.low_inclusive else "("
            raise ValueError(f"{self.param} must lie in {lb}{self.low:g}, {self.high:g}) for "
                             f"divergence={self.name!r}, got {value!r}{self.hint}")
        # The kernels use the parameter and 1 - parameter in fp32: a value fp32 cannot tell from
        # an endpoint would silently compute another divergence.
        if (0.0 < value < FP32_TINY) or value > 1.0 - FP32_EPS_HALF:
            raise ValueError(f"{self.param}={value!r} for divergence={self.name!r} is not "
                             f"representable in the kernels' fp32 arithmetic: use 0 (where "
                             f"allowed) or a value in [{FP32_TINY:.3g}, {1.0 - FP32_EPS_HALF!r}]")
        return value


DIVERGENCES = {
    d.name: d
    for d in (
        Divergence("forward_kl", 0, "KL(p||q) = sum p (log p - log q)", online=True),
        Divergence("reverse_kl", 1, "KL(q||p) = sum q (log q - log p)", online=True),
        Divergence("jsd", 2, "beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q",
                   param="beta", default=0.5,
                   hint="; TRL's special cases beta = 0 and beta = 1 are divergence='forward_kl' and "
                        "divergence='reverse_kl' respectively"),
        Divergence("skew_kl", 3, "KL(p||m), m = alpha p + (1-alpha) q",
                   param="alpha", default=0.1, low_inclusive=True),
        Divergence("skew_reverse_kl", 4, "KL(q||m), m = alpha q + (1-alpha) p",
                   param="alpha", default=0.1, low_inclusive=True),
        Divergence("tvd", 5, "1/2 sum |p - q|"),
        # Logit matching on row-centred logits: t~ = t - mean(t), s~ = s - mean(s). It is the
        # T -> infinity limit of T^2 KL(p||q), so temperature does not apply and there is no T^2
        # factor. Columns where teacher and student are both -inf (a shared masked vocabulary)
        # are left out, V then counting the other columns; any other -inf gives inf or NaN.
        Divergence("logit_mse", 6, "1/(2V) sum (t~ - s~)^2 on row-centred logits",
                   feature="logit_mse", uses_temperature=False),
    )
}

# The ids by name, for the code that branches on them.
FORWARD_KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD, LOGIT_MSE = (
    DIVERGENCES[n].id for n in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl",
                                "tvd", "logit_mse"))

def exchanged(div_id: int, param: float):
    """(id, param) of the divergence D' with D'(x, y) = D(y, x): the teacher's and the student's
    distributions exchanged. The gradient of D(p, q) with respect to the teacher logits is the
    STUDENT gradient of D'(q, p), so every kernel backend's student backward also gives teacher
    gradients, called with the two logit tensors swapped (``kdkernels.ops.dense.teacher_grad``):
    forward KL <-> reverse KL, jsd(β) -> jsd(1 − β), skew KL(α) <-> skew reverse KL(α); tvd and
    logit_mse are symmetric (docs/extensions.md)."""
    if div_id == FORWARD_KL:
        return REVERSE_KL, 0.0
    if div_id == REVERSE_KL:
        return FORWARD_KL, 0.0
    if div_id == JSD:
        return JSD, 1.0 - param
    if div_id == SKEW_KL:
        return SKEW_REVERSE_KL, param
    if div_id == SKEW_REVERSE_KL:
        return SKEW_KL, param
    if div_id in (TVD, LOGIT_MSE):
        return div_id, param
    raise ValueError(f"unknown divergence id {div_id}")


# The hard-label term is not a divergence: total per row =
#   soft_weight * T^2 * D(p, q) + hard_weight * CE(softmax(s), label)   (CE at T = 1)


def names() -> list:
    """Every divergence, including those only some backends implement."""
    return list(DIVERGENCES)


def kernel_names() -> list:
    """The six temperature divergences: those of the softmax kernels, of the vocab-parallel pass
    and of the sparse top-k loss. (``logit_mse`` runs on every kernel backend too, in kernels of
    its own, behind the "logit_mse" feature.)"""
    return [n for n, d in DIVERGENCES.items() if d.feature is None]


def get(name: str) -> Divergence:
    if not isinstance(name, str):
        raise TypeError(f"divergence must be a str, got {type(name).__name__}")
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence={name!r}; expected one of {names()}") from None


def resolve_param(div: Divergence, beta: Optional[float], alpha: Optional[float]) -> float:
    """The runtime parameter of ``div`` from the user's beta/alpha arguments.

    A parameter that does not belong to the divergence must be left at None, so a typo such as
    ``divergence="forward_kl", beta=0.3`` is an error rather than silently ignored.
    """
    given = {"beta": beta, "alpha": alpha}
    for pname, value in given.items():
        if value is not None and div.param != pname:
            raise ValueError(f"{pname} does not apply to divergence={div.name!r}"
                             + (f" (it takes {div.param})" if div.param else " (it takes no parameter)"))
    return div.check_param(given.get(div.param) if div.param else None)


# ---- the per-element math in PyTorch (the reference backend, the sparse head, the shards) ------
# Zero-probability conventions: 0·log 0 = 0 and −inf logits are legal. Every log that can be −inf
# is masked before it meets a product, so neither a value nor a gradient turns into NaN where a
# probability is exactly zero (the "where-NaN" trap of autograd).

_NEG_INF = float("-inf")


def xlog_ratio(x: Tensor, logx: Tensor, logy: Tensor) -> Tensor:
    """Elementwise x·(log x − log y) with 0·(anything) = 0 and NaN-free gradients at x = 0.
    NaN in x stays NaN (the guard tests x == 0, not x > 0)."""
    zero = x == 0
    return torch.where(zero, 0.0, x * (torch.where(zero, 0.0, logx) - torch.where(zero, 0.0, logy)))


def logaddexp(x1: Tensor, x2: Tensor) -> Tensor:
    """log(e^x1 + e^x2); −inf (with zero gradient) where both are −inf."""
    ok = (x1 > _NEG_INF) | (x2 > _NEG_INF)
    out = torch.logaddexp(torch.where(ok, x1, 0.0), torch.where(ok, x2, 0.0))
    return torch.where(ok, out, _NEG_INF)


def log_mix(w1: float, x: Tensor, y: Tensor) -> Tensor:
    """log(w1·e^x + (1 − w1)·e^y) for log-probabilities x, y and 0 <= w1 <= 1, in the kernels'
    form (``_log_mix`` in backends/triton/kernels.py, ``log_mix`` in csrc/include/kd_math.h):

        hi + log(w_hi + w_lo·e^(lo − hi)),   hi = max(x, y), lo = min(x, y),

    w_hi the weight of the larger term and w_lo = 1 − w_hi formed in the tensor's dtype. So x == y
    gives exactly x (w_hi + w_lo = 1, log 1 = 0: identical distributions have an exact 0
    divergence), the mixture never underflows in linear space, −inf (zero gradient) where both
    are −inf, NaN stays NaN. A w_hi below 2⁻⁶⁰ next to e^(lo − hi) < 2⁻¹¹⁵ is summed scaled by
    2⁶⁴ and the log shifted back, as in the kernels (both parts would be below the smallest
    normal float there)."""
    w1 = torch.as_tensor(w1, dtype=x.dtype, device=x.device)
    w2 = 1.0 - w1
    x_hi = x >= y
    hi, lo = torch.where(x_hi, x, y), torch.where(x_hi, y, x)
    w_hi, w_lo = torch.where(x_hi, w1, w2), torch.where(x_hi, w2, w1)
    d = lo - torch.where(hi == _NEG_INF, 0.0, hi)
    scaled = (w_hi < 8.67361738e-19) & (d < -80.0)             # w_hi < 2^-60, e^d < 2^-115
    shift = torch.where(scaled, 44.3614195558365, 0.0)         # 64 ln 2
    total = torch.where(scaled, w_hi * 1.8446744073709552e19, w_hi) + w_lo * torch.exp(d + shift)
    # w_hi = 0: m is the other distribution (w_lo = 1). The discarded branch gets a total of 1, so
    # that log(0) never meets a zero upstream gradient (0·inf = NaN) in backward.
    out = hi + (torch.log(torch.where(w_hi == 0.0, 1.0, total)) - shift)
    return torch.where(w_hi == 0.0, lo, out)


def log_softmax_centred(x: Tensor, inv_temperature: float) -> Tensor:
    """log softmax(x / T) as the kernels form it: (x − max x)·(1/T) − log Σ e^((x − max x)/T).

    The max is subtracted from the raw logits before the scaling, so x − max x is exact near the
    maximum (Sterbenz) and no rounding of x/T (ulp(x/T): 1e-3 at |x| = 1e4, T = 0.05) enters the
    log-probabilities of the likely tokens; rows that are equal give bitwise-equal results. The
    max is a constant for autograd (log_softmax does not depend on it). An all −inf row is NaN,
    as log_softmax gives."""
    m = x.detach().amax(dim=-1, keepdim=True)
    m = torch.where(m == _NEG_INF, 0.0, m)
    y = (x - m) * inv_temperature
    return y - torch.logsumexp(y, dim=-1, keepdim=True)


def _mixture(div_id: int, param: float, logp: Tensor, logq: Tensor) -> Optional[Tensor]:
    """log m of the mixture divergences (None for the others)."""
    if div_id in (JSD, SKEW_KL):
        return log_mix(param, logp, logq)
    if div_id == SKEW_REVERSE_KL:
        return log_mix(param, logq, logp)
    return None


def terms(div_id: int, param: float, logp: Tensor, logq: Tensor) -> Tensor:
    """Per-element φ(p_i, q_i) of divergence ``div_id`` (the sum over the last dim is D)."""
    p, q = logp.exp(), logq.exp()
    logm = _mixture(div_id, param, logp, logq)
    if div_id == FORWARD_KL:
        return xlog_ratio(p, logp, logq)
    if div_id == REVERSE_KL:
        return xlog_ratio(q, logq, logp)
    if div_id == JSD:
        return param * xlog_ratio(p, logp, logm) + (1.0 - param) * xlog_ratio(q, logq, logm)
    if div_id == SKEW_KL:
        return xlog_ratio(p, logp, logm)
    if div_id == SKEW_REVERSE_KL:
        return xlog_ratio(q, logq, logm)
    if div_id == TVD:
        return 0.5 * (p - q).abs()
    raise ValueError(f"unknown divergence id {div_id}")


def dphi_dlogq(div_id: int, param: float, logp: Tensor, logq: Tensor) -> Tensor:
    """u = ∂φ/∂log q = q·g elementwise (DESIGN.md §3), 0 where q = 0. The gradient w.r.t. the
    scaled student logits is then ∂D/∂b_j = u_j − q_j·Σ_k u_k."""
    p, q = logp.exp(), logq.exp()
    qpos = q > 0
    logm = _mixture(div_id, param, logp, logq)
    if div_id == FORWARD_KL:
        return -p
    if div_id == REVERSE_KL:
        return torch.where(qpos, q * (logq - logp + 1.0), 0.0)
    if div_id == JSD:
        return torch.where(qpos, (1.0 - param) * q * (logq - logm), 0.0)
    if div_id == SKEW_KL:  # φ = p log(p/m), m = α p + (1−α) q
        return torch.where(qpos & (p > 0), -(1.0 - param) * p * (logq - logm).exp(), 0.0)
    if div_id == SKEW_REVERSE_KL:  # φ = q log(q/m), m = α q + (1−α) p
        return torch.where(qpos, q * (logq - logm + 1.0 - param * (logq - logm).exp()), 0.0)
    if div_id == TVD:
        return 0.5 * torch.sign(q - p) * q
    raise ValueError(f"unknown divergence id {div_id}")
