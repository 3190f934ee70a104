"""torchtune: drop-ins for ``torchtune.modules.loss.ForwardKLLoss`` and
``ForwardKLWithChunkedOutputLoss``, computed by ``kdkernels.kd_loss``.

torchtune's value is the cross-entropy form H(p, q) = −Σ p log q per token (p = softmax(teacher),
q = softmax(student), no temperature), averaged over tokens whose label is not ``ignore_index``.
kdkernels returns the true divergence KL(p‖q) = H(p, q) − H(p): the two differ by the teacher
entropy H(p) = −Σ p log p, averaged over the same tokens. The offset does not depend on the student,
so gradients, and so training, are identical; only the logged number moves (KL is 0 when the
student matches the teacher, torchtune's value is then H(p)).

``cross_entropy_form=True`` adds the offset back (computed without gradient, in row chunks) and
reproduces torchtune's value. One difference remains: where a student logit is ±inf, torchtune
zeroes that entry's term, so a −inf student logit under teacher mass contributes nothing; here
it gives +inf, which is the divergence's value.
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["ForwardKLLoss", "ForwardKLWithChunkedOutputLoss", "teacher_entropy_sum"]

_CHUNK_ELEMENTS = 1 << 20


@torch.no_grad()
def teacher_entropy_sum(teacher_logits: torch.Tensor, labels: torch.Tensor, V: int,
                        ignore_index: int = -100) -> torch.Tensor:
    """Σ over counted tokens of H(softmax(teacher[..., :V])), in fp32, a chunk of rows at a time."""
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    keep = labels.reshape(-1) != ignore_index
    total = torch.zeros((), dtype=torch.float64 if t.dtype == torch.float64 else torch.float32,
                        device=t.device)
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for r in range(0, t.shape[0], step):
        lp = torch.log_softmax(t[r:r + step, :V].to(total.dtype), dim=-1)
        p = lp.exp()
        ent = -torch.where(p > 0, p * lp, 0.0).sum(-1)
        total += torch.where(keep[r:r + step], ent, 0.0).sum()
    return total


def _fkl_sum(student, teacher, labels, ignore_index, cross_entropy_form):
    from .. import kd_loss

    V = student.shape[-1]
    lab = labels.reshape(student.shape[:-1])
    total = kd_loss(student, teacher, "forward_kl", labels=lab, ignore_index=ignore_index,
                    reduction="sum")
    if cross_entropy_form:
        total = total + teacher_entropy_sum(teacher, lab, V, ignore_index)
    return total


class ForwardKLLoss(torch.nn.Module):
    """Forward KL over non-ignored tokens; ``forward(student_logits, teacher_logits, labels,
    normalize=True)`` as in torchtune. Returns KL(p‖q) (teacher entropy excluded) unless
    ``cross_entropy_form=True``, which returns torchtune's −Σ p log q value."""

    def __init__(self, ignore_index: int = -100, *, cross_entropy_form: bool = False):
        super().__init__()
        self.ignore_index = ignore_index
        self.cross_entropy_form = cross_entropy_form

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        total = _fkl_sum(student_logits, teacher_logits, labels, self.ignore_index,
                         self.cross_entropy_form)
        if not normalize:
            return total
        count = (labels != self.ignore_index).sum()
        return total / count.clamp_min(1).to(total.dtype)  # zero counted tokens -> 0


class ForwardKLWithChunkedOutputLoss(torch.nn.Module):
    """torchtune's chunked variant: lists of [B, L/c, V] logit chunks and [B, L] labels (chunked
    along dim 1 the same way). kdkernels never materialises fp32 [tokens, V], so chunking is not
    needed for memory; this class only accepts the chunked interface."""

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, *,
                 cross_entropy_form: bool = False):
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.cross_entropy_form = cross_entropy_form

    def forward(self, student_logits: List[torch.Tensor], teacher_logits: List[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        if len(student_logits) != len(teacher_logits):
            raise ValueError(f"student_logits has {len(student_logits)} chunks but teacher_logits "
                             f"has {len(teacher_logits)}")
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        if len(label_chunks) != len(student_logits):
            raise ValueError(f"labels split into {len(label_chunks)} chunks along dim 1, but "
                             f"{len(student_logits)} logit chunks were given")
        total = sum(_fkl_sum(s, t, y, self.ignore_index, self.cross_entropy_form)
                    for s, t, y in zip(student_logits, teacher_logits, label_chunks))
        count = (labels != self.ignore_index).sum()
        return total / count.clamp_min(1).to(total.dtype)
