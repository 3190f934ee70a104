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

__all__ = ["Divergence", "DIVERGENCES", "get", "resolve_param", "names", "kernel_names"]


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
    # Backend feature this divergence needs (see ``backends.FEATURES``); None for the divergences
    # every kernel backend implements. Backends lacking the feature are skipped by backend="auto".
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

# The hard-label term is not a divergence: total per row =
#   soft_weight * T^2 * D(p, q) + hard_weight * CE(softmax(s), label)   (CE at T = 1)


def names() -> list:
    """Every divergence, including those only some backends implement."""
    return list(DIVERGENCES)


def kernel_names() -> list:
    """The divergences every kernel backend implements (the six temperature divergences)."""
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
