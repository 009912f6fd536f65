import math

import pytest
import torch

from student_trainer.kd.losses import kd_loss, patient_loss
from student_trainer.kd.selection import supervision_weights


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(kd_loss(s, s.clone()), torch.zeros(2), atol=1e-7)
    assert (kd_loss(s, s.flip(-1))[0] > 0).item()


def test_kl_hand_checked_with_temperature():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]]) * 2.0  # at T = 2: teacher probs (3/4, 1/4)
    expected = 4.0 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert kd_loss(s, t, "kl", temperature=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_mse_on_raw_logits_per_instance():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    assert torch.allclose(kd_loss(s, t, "mse"), torch.tensor([2.5, 8.0]))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_gradient_reaches_student_not_teacher_nor_weights(kind):
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    w_kl, _ = supervision_weights(s)
    (w_kl * kd_loss(s, t, kind, temperature=2.0)).mean().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert not w_kl.requires_grad


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4)), "teacher_logits shape"),
        ((torch.zeros(2, 1), torch.zeros(2, 1)), "student_logits"),
        ((torch.zeros(2, 3), torch.zeros(3)), "teacher_logits"),
    ],
)
def test_kd_loss_bad_shapes(args, name):
    with pytest.raises(ValueError, match=name):
        kd_loss(*args)


def test_kd_loss_bad_kind_and_temperature():
    with pytest.raises(ValueError, match="kind"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), kind="ce")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)


def test_patient_loss_cls_hand_checked():
    # Two layers; layer 0 identical direction (0), layer 1 orthogonal unit vectors (distance 2).
    s = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    t = torch.tensor([[[5.0, 0.0], [0.0, 3.0]]])
    assert torch.allclose(patient_loss(s, t), torch.tensor([2.0]))


def test_patient_loss_is_scale_invariant_and_detaches_teacher():
    s = torch.randn(3, 2, 8, requires_grad=True)
    t = torch.randn(3, 2, 8, requires_grad=True)
    assert torch.allclose(patient_loss(s, t), patient_loss(s * 7.0, t * 0.1), atol=1e-5)
    patient_loss(s, t).sum().backward()
    assert s.grad is not None and t.grad is None


def test_patient_loss_all_tokens_ignores_padding():
    s = torch.randn(2, 3, 5, 4)
    t = torch.randn(2, 3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = patient_loss(s, t, mask)
    s2 = s.clone()
    s2[0, :, 3:] = torch.randn(3, 2, 4)  # change only padded positions of instance 0
    assert torch.allclose(patient_loss(s2, t, mask), base)
    unmasked = patient_loss(s[:1, :, :3], t[:1, :, :3])
    assert torch.allclose(base[:1], unmasked, atol=1e-6)


def test_patient_loss_empty_mask_gives_zero_not_nan():
    s, t = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out = patient_loss(s, t, torch.zeros(1, 3))
    assert torch.equal(out, torch.zeros(1))


def test_patient_loss_bad_input():
    with pytest.raises(ValueError, match="teacher_hidden shape"):
        patient_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="student_hidden"):
        patient_loss(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        patient_loss(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), torch.ones(2, 4))
