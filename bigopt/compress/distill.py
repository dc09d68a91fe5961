"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student learns from a frozen
teacher's softened output distribution as well as from the labels.

Both pieces plug into ``bigopt.train.hooks.TrainHooks``: ``TeacherFactory`` is the ``teacher``
(it rebuilds the teacher on the worker from an arch dict and a safetensors file, so no weights
are pickled), and ``DistillLoss`` is the ``loss_builder``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigopt.tasks import IGNORE_INDEX

LossFn = Callable[[Tensor, Tensor], Tensor]


def soft_target_kl(student: Tensor, teacher: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Mean over predictions of ``KL(softmax(teacher/T) || softmax(student/T))``, in fp32.

    Logits ``[..., V]`` are flattened to rows; a row whose ``target`` is ``IGNORE_INDEX`` (a
    padded token) is left out, as the cross entropy leaves it out. The teacher is detached:
    no gradient reaches it. With no row left, 0 (still attached to the student's graph).
    """
    s = student.float().reshape(-1, student.size(-1))
    t = teacher.detach().float().reshape(-1, teacher.size(-1))
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ")
    keep = target.reshape(-1) != IGNORE_INDEX
    if keep.numel() != s.size(0):
        raise ValueError(f"target {tuple(target.shape)} does not match logits {tuple(student.shape)}")
    if not bool(keep.all()):
        s, t = s[keep], t[keep]
    if s.size(0) == 0:
        return student.sum() * 0.0
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q) per row
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    return kl.mean()


@dataclass(frozen=True)
class DistillLossFn:
    """``loss(output, target, teacher_output)``; built by ``DistillLoss(...)(base_loss)``."""

    base_loss: LossFn
    alpha: float
    temperature: float

    def __call__(self, output: Tensor, target: Tensor, teacher_output: Tensor) -> Tensor:
        loss = output.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            # T^2 keeps the soft term's gradient scale independent of T (its gradients scale
            # as 1/T^2), so alpha means the same mix at any temperature
            kl = soft_target_kl(output, teacher_output, target, self.temperature)
            loss = loss + self.alpha * self.temperature**2 * kl
        if self.alpha < 1:  # skipped at alpha == 1 so an all-ignored batch's NaN CE cannot leak in
            loss = loss + (1.0 - self.alpha) * self.base_loss(output, target).float()
        return loss


@dataclass(frozen=True)
class DistillLoss:
    """``loss_builder`` hook: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * base``.

    Works for classifier logits ``[B, C]`` with targets ``[B]`` and LM logits ``[B, T, V]``
    with targets ``[B, T]`` (positions labelled ``IGNORE_INDEX`` are left out of both terms
    when ``base_loss`` ignores them too, as ``bigopt.tasks.cross_entropy`` does).
    """

    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float)
                or not 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be a float in [0, 1], got {self.alpha!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float)
                or not self.temperature > 0):
            raise ValueError(f"temperature must be a float > 0, got {self.temperature!r}")

    def __call__(self, base_loss: LossFn) -> DistillLossFn:
        return DistillLossFn(base_loss, float(self.alpha), float(self.temperature))


@dataclass(frozen=True)
class TeacherFactory:
    """``teacher`` hook: rebuilds the frozen teacher on the worker.

    Only the arch dict and the path travel by pickle; the weights are read there from a
    ``.safetensors`` file holding the module's state dict (no pickle, so safe to load from
    anywhere). The teacher is in eval mode with ``requires_grad`` off; ``device`` (e.g.
    "cuda:0") is where the weights are loaded, CPU by default.
    """

    arch: dict[str, Any]
    weights_path: str
    device: str | None = None

    def __call__(self) -> nn.Module:
        from safetensors.torch import load_file

        from bigopt.models import from_arch

        model = from_arch(self.arch)
        state = load_file(self.weights_path, device=self.device or "cpu")
        model.load_state_dict(state, strict=True)
        if self.device is not None:
            model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        return model
