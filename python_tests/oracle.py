"""An independent float64 oracle for the DESIGN.md §2 definitions, on dense tensors.

Written separately from kdkernels.backends.reference (no shared code): −inf logits are replaced by a huge
finite negative number, so exp gives exactly 0 and every product 0·log(·) is finite, which keeps
autograd free of NaN without any masking logic.
"""
import math

import torch

def _floor(x):  # the most negative finite number of x's dtype (-1.8e308 in float64)
    return x.clamp_min(torch.finfo(x.dtype).min)


def _logsm(x):
    return torch.log_softmax(_floor(x), dim=-1)


def _kl(lx, ly):  # KL(x || y) from log-probabilities, summed over the last dim
    return (lx.exp() * (lx - ly)).sum(-1)


def _mix(w, la, lb):  # log(w e^la + (1-w) e^lb); la, lb finite, so no log 0 anywhere
    if w == 0:
        return lb
    return _floor(torch.logaddexp(la + math.log(w), lb + math.log1p(-w)))


def logit_mse(t, s):
    """(1/2V') Σ (t̃ − s̃)², each row centred over the V' columns that are not −inf in both."""
    shared = torch.isneginf(t) & torch.isneginf(s)
    n = (~shared).sum(-1, keepdim=True).clamp_min(1)
    tc, sc = torch.where(shared, 0.0, t), torch.where(shared, 0.0, s)
    d = (tc - tc.sum(-1, keepdim=True) / n) - (sc - sc.sum(-1, keepdim=True) / n)
    return torch.where(shared, 0.0, d).square().sum(-1) / (2 * n[..., 0])


def divergence(name, logp, logq, beta=0.5, alpha=0.1):
    if name == "logit_mse":
        # centred log_softmax(x / T) is x̃ / T, so T² times this is logit_mse of the logits
        return logit_mse(logp, logq)
    if name == "forward_kl":
        return _kl(logp, logq)
    if name == "reverse_kl":
        return _kl(logq, logp)
    if name == "jsd":
        m = _mix(beta, logp, logq)
        return beta * _kl(logp, m) + (1 - beta) * _kl(logq, m)
    if name == "skew_kl":
        return _kl(logp, _mix(alpha, logp, logq))
    if name == "skew_reverse_kl":
        return _kl(logq, _mix(alpha, logq, logp))
    if name == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(name)


def rows(student, teacher, divergence_name="forward_kl", temperature=1.0, labels=None,
         ignore_index=-100, soft_weight=1.0, hard_weight=0.0, beta=0.5, alpha=0.1,
         dtype=torch.float64, teacher_weights=None):
    """Per-row loss with the leading shape; ignored rows give 0. ``dtype`` other than float64
    evaluates the same formula in lower precision: the "plain PyTorch" error of the three-way
    bound. With ``teacher_weights``, ``teacher`` is a list of M tensors and the target is
    p = Σ_m w_m softmax(t_m / T) (logit_mse: the logits Σ_m w_m t_m); zero weights drop out."""
    V = student.shape[-1]
    s = student.to(dtype)
    T = float(temperature)
    if teacher_weights is None:
        t = teacher[..., :V].to(dtype)
        logp = _logsm(t / T)
    else:
        ts = [(w, x[..., :V].to(dtype)) for w, x in zip(teacher_weights, teacher) if w > 0]
        t = sum(w * x for w, x in ts)
        logp = _floor(torch.logsumexp(torch.stack([math.log(w) + _logsm(x / T) for w, x in ts]), 0))
    if divergence_name == "logit_mse":  # on the logits: no temperature, no T²
        out = soft_weight * logit_mse(t, s)
    else:
        out = soft_weight * T * T * divergence(divergence_name, logp, _logsm(s / T), beta, alpha)
    if labels is not None:
        keep = labels != ignore_index
        if hard_weight:
            lab = torch.where(keep, labels, 0).unsqueeze(-1)
            out = out - hard_weight * _logsm(s).gather(-1, lab).squeeze(-1)
        out = torch.where(keep, out, torch.zeros_like(out))
    return out


def loss(student, teacher, reduction="batchmean", num_items_in_batch=None, **kw):
    r = rows(student, teacher, **kw)
    if reduction == "none":
        return r
    if reduction == "sum":
        return r.sum()
    labels, ii = kw.get("labels"), kw.get("ignore_index", -100)
    n = num_items_in_batch if num_items_in_batch is not None else (
        r.numel() if labels is None else int((labels != ii).sum()))
    out = r.sum() / max(n, 1)
    return out / student.shape[-1] if reduction == "mean" else out


def loss_and_grad(student, teacher, dtype=torch.float64, **kw):
    """Oracle loss and its gradient w.r.t. the student logits (float64 unless ``dtype``)."""
    s = student.detach().to(dtype).requires_grad_(True)
    out = loss(s, teacher.detach(), dtype=dtype, **kw)
    (g,) = torch.autograd.grad(out.sum(), s)
    return out.detach(), g
