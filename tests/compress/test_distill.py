"""Knowledge distillation: the loss against a hand computation, and the teacher factory."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bigopt.compress.distill import DistillLoss, TeacherFactory
from bigopt.models import build_model
from bigopt.tasks import IGNORE_INDEX, cross_entropy


def by_hand(student: list[list[float]], teacher: list[list[float]], labels: list[int],
            alpha: float, t: float) -> float:
    """The Hinton et al. loss with plain Python floats."""
    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    kl = ce = 0.0
    for s_row, t_row, label in zip(student, teacher, labels, strict=True):
        p, q = softmax(t_row), softmax(s_row)
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
        ce -= math.log(math.exp(s_row[label]) / sum(math.exp(v) for v in s_row))
    n = len(labels)
    return alpha * t * t * kl / n + (1 - alpha) * ce / n


STUDENT = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
TEACHER = [[2.5, 0.0, 1.0], [-0.4, 1.5, 0.2]]
LABELS = [2, 1]


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 2.0), (1.0, 4.0), (0.0, 3.0), (0.3, 1.0)])
def test_loss_equals_hand_computation(alpha: float, temperature: float) -> None:
    loss = DistillLoss(alpha, temperature)(cross_entropy)
    got = loss(torch.tensor(STUDENT), torch.tensor(LABELS), torch.tensor(TEACHER))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(by_hand(STUDENT, TEACHER, LABELS, alpha, temperature), rel=1e-5)


def test_soft_term_is_scaled_by_t_squared() -> None:
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    for temperature in (1.0, 2.0, 5.0):
        soft = float(DistillLoss(1.0, temperature)(cross_entropy)(s, y, t))
        kl = by_hand(STUDENT, TEACHER, LABELS, 1.0, temperature) / temperature**2
        assert soft == pytest.approx(temperature**2 * kl, rel=1e-5)


def test_gradient_reaches_the_student_only() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    DistillLoss(0.7, 2.0)(cross_entropy)(student, torch.tensor(LABELS), teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_low_precision_logits_are_computed_in_fp32() -> None:
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    fn = DistillLoss(0.5, 2.0)(cross_entropy)
    got = fn(s.bfloat16(), y, t.bfloat16())
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(fn(s.bfloat16().float(), y, t.bfloat16().float())), rel=1e-6)


def test_token_level_logits_leave_out_ignored_positions() -> None:
    torch.manual_seed(0)
    b, t, v = 2, 5, 7
    student, teacher = torch.randn(b, t, v), torch.randn(b, t, v)
    labels = torch.randint(0, v, (b, t))
    labels[0, 3:] = IGNORE_INDEX  # padding
    labels[1, 0] = IGNORE_INDEX
    fn = DistillLoss(0.4, 3.0)(cross_entropy)
    got = float(fn(student, labels, teacher))
    keep = labels.reshape(-1) != IGNORE_INDEX
    rows = lambda z: z.reshape(-1, v)[keep].tolist()  # noqa: E731
    assert got == pytest.approx(by_hand(rows(student), rows(teacher), labels.reshape(-1)[keep].tolist(),
                                        0.4, 3.0), rel=1e-5)
    # what the teacher says about padded positions does not matter
    teacher[0, 4] += 100.0
    assert float(fn(student, labels, teacher)) == pytest.approx(got, rel=1e-6)
    # a batch of padding only: no NaN from the soft term
    assert float(DistillLoss(1.0, 2.0)(cross_entropy)(student, torch.full_like(labels, IGNORE_INDEX),
                                                      teacher)) == 0.0


@pytest.mark.parametrize("kwargs", [{"alpha": -0.1}, {"alpha": 1.5}, {"alpha": True},
                                    {"temperature": 0.0}, {"temperature": -1.0}])
def test_invalid_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DistillLoss(**kwargs)


def test_teacher_factory_rebuilds_a_frozen_teacher_from_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = build_model("gpt", vocab_size=32, context=8, n_layer=1, n_head=2, d_model=16)
    path = tmp_path / "model.safetensors"
    save_file(teacher.state_dict(), path)
    factory = pickle.loads(pickle.dumps(TeacherFactory(teacher.arch(), str(path))))
    rebuilt = factory()
    assert not rebuilt.training
    assert not any(p.requires_grad for p in rebuilt.parameters())
    x, y = teacher.example_input(2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), teacher.eval()(x))
    # a student trained against it: the loss is differentiable for the student only
    student = build_model("gpt", vocab_size=32, context=8, n_layer=1, n_head=1, d_model=8)
    loss = DistillLoss(0.5, 2.0)(cross_entropy)(student(x), y, rebuilt(x))
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
