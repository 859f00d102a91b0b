"""Every config in every group composes, and what it names builds."""

import pytest
import torch

from hydra.utils import get_method

from genlab.build import build_dataset, build_model, build_optimizers, build_schedulers
from genlab.data import ImageData
from genlab.models import GenerativeModel

from conftest import compose_train, options

def test_groups_are_not_empty():
    for group in ("model", "dataset", "loss", "optimizer", "scheduler", "experiment"):
        assert options(group), group


@pytest.mark.parametrize("model", options("model"))
def test_model_builds(model):
    cfg = compose_train([f"model={model}", *(["dataset.image_size=32"] if model == "dcgan64" else [])])
    m = build_model(cfg)
    assert isinstance(m, GenerativeModel)
    opts = build_optimizers(cfg.optimizer, m)
    assert set(opts) == set(m.optimizer_groups())
    x = m.sample(3)
    assert x.shape == (3, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)


@pytest.mark.parametrize("dataset", options("dataset"))
def test_dataset_builds(dataset, fake_root, tmp_path):
    overrides = [f"dataset={dataset}"]
    if dataset in ("mnist", "fashion_mnist", "cifar10"):
        overrides += [f"dataset.root={fake_root}", "dataset.download=false"]
    if dataset == "folder":
        from PIL import Image

        for i in range(4):
            Image.new("RGB", (40, 30), (60 * i, 10, 200)).save(tmp_path / f"im{i}.png")
        overrides += [f"dataset.root={tmp_path}"]
    cfg = compose_train(overrides)
    data = build_dataset(cfg.dataset, train=True)
    assert isinstance(data, ImageData) and data.images.dtype == torch.uint8
    assert data.image_shape == (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    assert len(data.labels) == len(data) > 0
    # the default model takes every dataset's shape
    build_model(cfg)


@pytest.mark.parametrize("loss", options("loss"))
def test_loss_builds(loss):
    cfg = compose_train([f"loss={loss}", f"model={'vae' if loss == 'elbo' else 'gan'}"])
    assert type(build_model(cfg).loss) is get_method(cfg.loss._target_)


@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_scheduler_builds(scheduler):
    cfg = compose_train([f"scheduler={scheduler}", "scheduler.warmup=10"])
    opts = build_optimizers(cfg.optimizer, build_model(cfg))
    schedulers = build_schedulers(cfg.scheduler, opts, total_steps=100)
    assert set(schedulers) == set(opts)
    assert all(o.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr / 10) for o in opts.values())  # warm-up


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_optimizer_builds(optimizer):
    cfg = compose_train([f"optimizer={optimizer}", "+optimizer.nets.d.lr=0.123"])
    opts = build_optimizers(cfg.optimizer, build_model(cfg))
    assert opts["d"].param_groups[0]["lr"] == 0.123
    assert opts["g"].param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_builds(experiment, fake_root):
    cfg = compose_train([f"experiment={experiment}", f"dataset.root={fake_root}", "dataset.download=false"])
    model = build_model(cfg)
    build_optimizers(cfg.optimizer, model)
    data = build_dataset(cfg.dataset, train=True)
    assert data.image_shape == (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)


def test_experiment_pins_the_seed_settings():
    cfg = compose_train(["experiment=dcgan_mnist"])
    assert (cfg.optimizer.lr, cfg.trainer.batch_size, cfg.trainer.epochs) == (1e-4, 256, 50)
    assert cfg.dataset._target_.endswith("mnist")


def test_model_picks_its_default_loss():
    assert compose_train(["model=vae"]).loss._target_ == "genlab.losses.ELBO"
    assert compose_train(["model=dcgan"]).loss._target_ == "genlab.losses.BCE"
    assert compose_train(["model=gan", "loss=hinge"]).loss._target_ == "genlab.losses.Hinge"


def test_dataset_root_from_environment(monkeypatch):
    monkeypatch.setenv("GENLAB_DATA", "/somewhere/data")
    assert compose_train(["dataset=mnist"]).dataset.root == "/somewhere/data"
