"""Every config in every group composes, and what it names builds."""

import pytest
import torch

from hydra.utils import get_method
from omegaconf import OmegaConf

from genlab import checkpoint
from genlab.data import ImageData
from genlab.errors import GenlabError
from genlab.models import GenerativeModel
from genlab.parts import build_dataset, build_model, build_optimizers, build_schedulers
from genlab.train import resumed_config

from conftest import compose_train, make_trainer, options

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
    if not m.generates:  # an anomaly detector (draem): sampling is refused in one line
        with pytest.raises(GenlabError, match="draws no images"):
            m.sample(3)
        return
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
    if dataset == "mvtec":
        from test_mvtec import layout

        overrides += [f"dataset.root={layout(tmp_path)}"]
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
def test_experiment_builds(experiment, fake_root, tmp_path):
    """Every preset builds its model, optimizers and data: torchvision's on tiny files, a folder's on a few PNGs."""
    target = compose_train([f"experiment={experiment}"]).dataset._target_
    if target.endswith(".mvtec"):
        from test_mvtec import layout

        data = [f"dataset.root={layout(tmp_path)}"]
    elif target.endswith(".folder"):
        from PIL import Image

        (tmp_path / "images").mkdir()
        for i in range(12):
            Image.new("RGB", (40, 30), (20 * i, 90, 200 - 10 * i)).save(tmp_path / "images" / f"{i}.png")
        data = [f"dataset.root={tmp_path / 'images'}"]
    else:
        data = [f"dataset.root={fake_root}", "dataset.download=false"]
    cfg = compose_train([f"experiment={experiment}", *data])
    model = build_model(cfg)
    build_optimizers(cfg.optimizer, model)
    data = build_dataset(cfg.dataset, train=True)
    assert data.image_shape == (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)


def test_the_cifar10_presets_are_the_measured_commands():
    """docs/results.md measured the CIFAR-10 cGAN as `experiment=cgan_mnist dataset=cifar10`, and the one-class
    VAE as `experiment=vae_one_class_mnist dataset=cifar10 trainer.epochs=50`: the presets are those."""
    assert compose_train(["experiment=cgan_cifar10"]) == compose_train(["experiment=cgan_mnist", "dataset=cifar10"])
    assert compose_train(["experiment=vae_one_class_cifar10"]) == compose_train(
        ["experiment=vae_one_class_mnist", "dataset=cifar10", "trainer.epochs=50"])  # as measured


def test_experiment_pins_the_seed_settings():
    cfg = compose_train(["experiment=dcgan_mnist"])
    assert (cfg.optimizer.lr, cfg.trainer.batch_size, cfg.trainer.epochs) == (1e-4, 256, 50)
    assert cfg.dataset._target_.endswith("mnist")


def test_model_picks_its_default_loss():
    assert compose_train(["model=vae"]).loss._target_ == "genlab.losses.ELBO"
    assert compose_train(["model=dcgan"]).loss._target_ == "genlab.losses.BCE"
    assert compose_train(["model=gan", "loss=hinge"]).loss._target_ == "genlab.losses.Hinge"


def test_a_model_sets_its_own_optimizer_defaults():
    """model/vae.yaml and model/vae_gan.yaml set their measured learning rates over the optimizer's (docs/results.md),
    and model_optimizer/vae_adam.yaml the VAE's Adam betas; a model that sets none trains at the optimizer's."""
    vae, vae_gan, dcgan = (compose_train([f"model={m}"]).optimizer for m in ("vae", "vae_gan", "dcgan"))
    assert vae.lr == 2e-3 and list(vae.betas) == [0.9, 0.999] and not vae.nets
    assert vae_gan.lr == 2e-3 and vae_gan.nets.d.lr == 5e-4 and list(vae_gan.betas) == [0.5, 0.999]
    assert dcgan.lr == 2e-4 and not dcgan.nets and list(dcgan.betas) == [0.5, 0.999]


def test_the_command_line_and_presets_win_over_the_models_defaults():
    assert compose_train(["model=vae", "optimizer.lr=1e-4"]).optimizer.lr == 1e-4
    assert list(compose_train(["model=vae", "optimizer.betas=[0.5,0.99]"]).optimizer.betas) == [0.5, 0.99]
    assert list(compose_train(["experiment=wgan_gp_mnist", "model=vae"]).optimizer.betas) == [0.0, 0.9]  # the preset's
    assert compose_train(["model=vae_gan", "optimizer.nets.d.lr=1e-5"]).optimizer.nets.d.lr == 1e-5
    preset = compose_train(["experiment=vae_fashion_mnist"]).optimizer
    assert preset.lr == 1e-3 and list(preset.betas) == [0.9, 0.999]
    assert compose_train(["model=vae", "experiment=dcgan_mnist"]).optimizer.lr == 1e-4  # the command's model, the preset's lr
    tuned = compose_train(["experiment=vae_gan_mnist"]).optimizer
    assert (tuned.lr, tuned.nets.d.lr) == (2e-3, 5e-4)


@pytest.mark.parametrize("model", ["vae", "vae_gan"])
@pytest.mark.parametrize("optimizer,cls", [("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop)])
def test_another_optimizer_takes_the_models_learning_rate_and_nothing_else(model, optimizer, cls):
    cfg = compose_train([f"model={model}", f"optimizer={optimizer}"])
    assert "betas" not in cfg.optimizer and cfg.optimizer.lr == 2e-3
    opts = build_optimizers(cfg.optimizer, build_model(cfg))
    assert opts and all(type(o) is cls for o in opts.values())


def test_the_built_optimizer_runs_at_the_models_rate_and_the_checkpoint_keeps_it(tmp_path):
    trainer = make_trainer(["model=vae", "dataset=synthetic", "dataset.n=16", "trainer.batch_size=8",
                            "trainer.max_steps=1", "trainer.n_samples=4"], tmp_path)
    assert trainer.ctx.optimizers["vae"].param_groups[0]["lr"] == 2e-3
    assert trainer.ctx.optimizers["vae"].param_groups[0]["betas"] == (0.9, 0.999)
    trainer.fit()
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["config"]["optimizer"]["lr"] == 2e-3
    gan = make_trainer(["model=vae_gan", "dataset=synthetic", "dataset.n=16"], tmp_path / "gan")
    assert {k: o.param_groups[0]["lr"] for k, o in gan.ctx.optimizers.items()} == {"encoder": 2e-3, "decoder": 2e-3,
                                                                                  "d": 5e-4}


@pytest.mark.parametrize("choices", [None, {"model": "vae", "optimizer": "adam"}])
def test_a_run_from_before_the_models_defaults_resumes_at_its_own_rate(choices):
    """A VAE run started at Adam 2e-4 (the default then), resumed by its own command: it keeps its stored rate."""
    stored = OmegaConf.to_container(compose_train(["model=vae"]), resolve=True)
    stored["optimizer"]["lr"] = 2e-4
    args = ["model=vae", "resume=somewhere"]
    assert resumed_config(stored, compose_train(args), args, choices).optimizer.lr == 2e-4


def test_dataset_root_from_environment(monkeypatch):
    monkeypatch.setenv("GENLAB_DATA", "/somewhere/data")
    assert compose_train(["dataset=mnist"]).dataset.root == "/somewhere/data"
