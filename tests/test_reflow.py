"""Reflow (teacher.run=RUN): flow matching trained on a teacher's pairs of noise and image. The objective against a
hand computation, the student's start from the teacher, and the teachers refused."""


import pytest
import torch
from torch import nn

from genlab.data import Batch
from genlab.errors import GenlabError
from genlab.models import FlowMatching

from conftest import StepRecorder, make_trainer

SMALL = ["model=flow", "model.unet.width=8", "dataset=synthetic", "dataset.n=64", "dataset.image_size=8",
         "trainer.batch_size=32", "trainer.n_samples=4", "trainer.ema.decay=0.9"]


class Scaled(nn.Module):
    """out = a x + b t/1000: a velocity written down by hand."""

    num_classes, image_shape = 0, (1, 2, 2)

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, labels=None):
        return self.a * x + (self.b * t / 1000).view(-1, 1, 1, 1)


def test_the_reflow_loss_pairs_the_noise_with_the_teachers_image_of_it():
    """The teacher (one Euler step from t=1) turns the batch's noise z into z - v(z, 1), clamped to [-1, 1]; the
    student learns the velocity z - that image at x_t = (1 - t) image + t z, whatever the data was."""
    student, teacher = FlowMatching(Scaled(0.5, -0.3), time_sampling="uniform"), FlowMatching(Scaled(0.2, 0.4))
    student.reflow_from(teacher, steps=1, sampler="euler")
    ctx = StepRecorder()
    x = torch.rand(3, 1, 2, 2)
    torch.manual_seed(0)
    student.training_step(Batch(x, torch.zeros(3, dtype=torch.long)), ctx)
    torch.manual_seed(0)
    z = torch.randn(3, 1, 2, 2)
    image = (z - (0.2 * z + 0.4)).clamp(-1, 1)
    t = torch.rand(3).view(-1, 1, 1, 1)
    xt = (1 - t) * image + t * z
    expected = ((0.5 * xt - 0.3 * t) - (z - image)).pow(2).mean()
    assert ctx.losses[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "teacher" not in str(student.state_dict().keys())  # not part of the student's weights
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    make_trainer([*SMALL, "trainer.max_steps=3"], run).fit()
    return run


def test_the_student_starts_from_the_teachers_moving_average(teacher_run, tmp_path):
    ema = torch.load(teacher_run / "checkpoints" / "last.pt", weights_only=False)["ema"]["model"]
    trainer = make_trainer([*SMALL, f"teacher.run={teacher_run}", "teacher.steps=2"], tmp_path)
    student = trainer.model
    for key, value in student.state_dict().items():
        assert torch.equal(value, ema[key]), key
        assert torch.equal(trainer.ema.model.state_dict()[key], ema[key]), key  # its average starts there too
    assert student.teacher[1:] == (2, "dpmpp_2m")
    assert trainer.ema.model.teacher is None  # the average holds no copy of the teacher
    fresh = make_trainer([*SMALL, f"teacher.run={teacher_run}", "teacher.init=false"], tmp_path / "b").model
    assert not torch.equal(fresh.unet.head[-1].weight, student.unet.head[-1].weight)


@pytest.mark.parametrize("overrides,message", [
    (["model.unet.width=16"], "teacher.init=false"),
    (["model=ddpm", "model.unet.width=8"], "reflow trains flow matching"),
    (["dataset.image_size=16"], "the teacher makes (1, 8, 8) images"),
])
def test_a_teacher_that_does_not_fit_is_refused_by_name(teacher_run, tmp_path, overrides, message):
    with pytest.raises(GenlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_trainer([*SMALL, *overrides, f"teacher.run={teacher_run}"], tmp_path)
