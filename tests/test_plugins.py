"""The parts that plug in, each from genlab and from examples/plugin/ through the real commands: samplers,
GAN augmentations and regularizers, anomaly scores, writers (callbacks=), and the debug= presets."""

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from genlab import checkpoint
from genlab.augment import Translation
from genlab.data import Batch
from genlab.errors import GenlabError
from genlab.losses import BCE
from genlab.models import GAN
from genlab.parts import build_model
from genlab.regularizers import R1, R2, GradientPenalty
from genlab.scores import score_for
from genlab.step import StepContext
from genlab.train import debugging

from conftest import compose_train, genlab, genlab_here, make_trainer

PLUGINS = Path(__file__).resolve().parents[1] / "examples" / "plugin"
ENV = {"PYTHONPATH": str(PLUGINS)}
CONFIGS = ["--config-dir", str(PLUGINS / "configs")]
SMALL = ["dataset=synthetic", "dataset.n=64", "trainer.batch_size=32", "trainer.max_steps=2", "device=cpu",
         "trainer.n_samples=4", "trainer.progress=false"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("flow") / "run"
    r = genlab_here("train", "model=flow", "model.unet.width=8", *SMALL, "trainer.sampling.steps=2",
                    f"hydra.run.dir={run}", cwd=run.parent)
    assert r.returncode == 0, r.stderr
    return run


def test_a_sampler_of_ones_own_from_its_yaml(flow_run, tmp_path, monkeypatch):
    """sampler=midpoint (examples/plugin/midpoint.py) on a flow run: samples of their own; genlab's Heun differs
    from it; a setting it does not have is refused by name."""
    monkeypatch.syspath_prepend(str(PLUGINS))  # in this process, as PYTHONPATH puts it for a command

    def sample(*args):
        out = tmp_path / "-".join(a.split("=")[-1] for a in args)
        r = genlab_here("sample", *CONFIGS, f"ckpt={flow_run}", "n=4", "steps=3", *args, f"hydra.run.dir={out}",
                        cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return torch.load(out / "samples.pt", weights_only=True)

    midpoint, heun = sample("sampler=midpoint"), sample("sampler=heun")
    assert midpoint.shape == (4, 1, 28, 28) and not torch.equal(midpoint, heun)
    r = genlab_here("sample", *CONFIGS, f"ckpt={flow_run}", "sampler=midpoint", "+sampler.order=2", cwd=tmp_path)
    assert r.returncode == 1 and "sampler.order is not a setting of Midpoint; it has no settings" in r.stderr


def test_an_anomaly_score_of_ones_own_and_the_registry(flow_run, tmp_path, monkeypatch):
    """score=latent_norm (examples/plugin/latent_norm.py) needs an encoder: refused for flow matching with the scores
    it offers; genlab's own scores are asked for by what they need, not by the model's class."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    r = genlab_here("evaluate", *CONFIGS, f"ckpt={flow_run}", "score=latent_norm", "normal_classes=[0]", cwd=tmp_path)
    assert r.returncode == 1 and "score=latent_norm is not offered by FlowMatching: use denoise" in r.stderr
    model = build_model(compose_train(["model=vae", "dataset=synthetic"])).eval()
    assert score_for(model, None).name == "corrected" and score_for(model, "mse").name == "mse"
    with pytest.raises(GenlabError, match="score=critic is not offered by VAE: use corrected"):
        score_for(model, "critic")


def test_the_example_score_reports_on_a_vae(tmp_path):
    run = tmp_path / "vae"
    r = genlab_here("train", "model=vae", "dataset.classes=[0]", "trainer.max_steps=20", "device=cpu",
                    "trainer.progress=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", *CONFIGS, f"ckpt={run}", "score=latent_norm", f"hydra.run.dir={tmp_path / 'e'}",
               cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["score"] == "latent_norm" and 0 <= report["auroc"] <= 1


def test_an_augmentation_and_regularizers_from_config(tmp_path, monkeypatch):
    """augment=flip (examples/plugin/flip.py) and regularizer=[r1,gp] reach the GAN, and train; a model with no
    discriminator refuses them in one line."""
    monkeypatch.syspath_prepend(str(PLUGINS))  # in this process, as PYTHONPATH puts it for a command
    run = tmp_path / "run"
    r = genlab_here("train", *CONFIGS, "model=dcgan", "augment=flip", "regularizer=[r1,gp]",
                    "model.regularizers.r1.every=1", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = checkpoint.load(run)["config"]["model"]
    assert model["augment"] == {"_target_": "flip.Flip", "p": 0.5}
    assert set(model["regularizers"]) == {"r1", "gp"} and model["regularizers"]["r1"]["every"] == 1
    r = genlab_here("train", "model=vae", "augment=translation", *SMALL, cwd=tmp_path)
    assert r.returncode == 1 and "model.augment is not a setting of VAE" in r.stderr


def test_translation_moves_each_image_within_its_ratio_and_passes_gradients():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0  # one bright pixel, at the centre
    y = Translation(0.125)(x)
    where = y.flatten(1).argmax(1)
    rows, cols = where // 16 - 8, where % 16 - 8
    assert y.shape == x.shape and (y.flatten(1).sum(1) == 1).all()  # moved, not lost (2 pixels at most)
    assert rows.abs().max() == 2 and cols.abs().max() == 2 and len(set(zip(rows.tolist(), cols.tolist()))) > 10
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    Translation(0.25)(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


class Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x.flatten(1) * self.w).sum(1)


def test_r1_is_the_gradients_norm_on_real_images_lazily():
    """For a linear critic w.x the gradient is w everywhere: R1 = gamma / 2 * every * |w|^2, on the steps it is
    due and None between them. For (w.x)^2 the gradient differs per image: R1 takes the real ones, R2 the fakes."""
    w = torch.randn(12)
    critic, real = Linear(w), torch.randn(5, 3, 2, 2)
    r1 = R1(gamma=2.0, every=4)
    torch.testing.assert_close(r1(critic, real, real, 8), 0.5 * 2.0 * 4 * w.pow(2).sum())
    assert r1(critic, real, real, 9) is None
    bent = lambda x: (x.flatten(1) * w).sum(1) ** 2  # noqa: E731  # gradient 2 (w.x) w: R2 is R1 at the fakes
    fake = torch.randn(5, 3, 2, 2)
    expected = lambda x: 0.5 * 2.0 * 4 * (2 * (x.flatten(1) @ w)[:, None] * w).pow(2).sum(1).mean()  # noqa: E731
    torch.testing.assert_close(R2(gamma=2.0, every=4)(bent, real, fake, 8), expected(fake))
    torch.testing.assert_close(r1(bent, real, fake, 8), expected(real))
    with pytest.raises(GenlabError, match="every >= 1"):
        R1(every=0)


def test_the_gradient_penalty_part_is_loss_gp_weight():
    """loss.gp_weight=10 and regularizers={gp: GradientPenalty(10)} train the same step, to the bit."""
    def step(loss, regularizers):
        torch.manual_seed(0)
        g = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Unflatten(1, (3, 2, 2)))
        g.z_dim = 4
        model = GAN(g, nn.Sequential(nn.Flatten(), nn.Linear(12, 1), nn.Flatten(0)), loss, regularizers=regularizers)
        opts = {k: torch.optim.SGD(p, lr=0.1) for k, p in model.optimizer_groups().items()}
        ctx = StepContext(opts)
        ctx.begin(0)
        model.training_step(Batch(torch.rand(8, 3, 2, 2), torch.zeros(8, dtype=torch.long)), ctx)
        ctx.end()
        return [p.detach().clone() for p in model.parameters()]

    a, b = step(BCE(gp_weight=10.0), None), step(BCE(), {"gp": GradientPenalty(10.0)})
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = step(BCE(), None)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # the penalty moved the discriminator


def test_writers_are_a_config_group(tmp_path):
    """callbacks=[default,jsonl] adds a writer of one's own to genlab's; ~callbacks.NAME leaves one out;
    callbacks=none writes nothing."""
    one = tmp_path / "one"
    r = genlab("train", *CONFIGS, "callbacks=[default,jsonl]", "~callbacks.loss_curves", *SMALL, "trainer.log_every=1",
               f"hydra.run.dir={one}", cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    with open(one / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [x["step"] for x in lines[:-1]] == [1, 2]
    assert lines[-1] == {"status": "finished", "step": 2}
    assert not (one / "loss_curves.png").exists() and (one / "checkpoints" / "last.pt").is_file()
    none = tmp_path / "none"
    r = genlab_here("train", "callbacks=none", *SMALL, f"hydra.run.dir={none}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in none.iterdir()) == [".hydra", "env.json", "train.log"]  # what it ran on, still


def test_debug_presets(tmp_path):
    """debug=fdr: three steps with anomaly detection and deterministic algorithms, a row each step, every writer."""
    cfg = compose_train(["debug=fdr"])
    assert cfg.trainer.max_steps == 3 and cfg.trainer.detect_anomaly and cfg.trainer.deterministic
    run = tmp_path / "run"
    r = genlab("train", "debug=fdr", "device=cpu", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(run / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    assert checkpoint.load(run)["step"] == 3 and (run / "samples" / "epoch_0001.png").is_file()
    with debugging(cfg.trainer):  # in force for the loop, put back after it
        assert torch.are_deterministic_algorithms_enabled() and torch.is_anomaly_enabled()
    assert not torch.are_deterministic_algorithms_enabled() and not torch.is_anomaly_enabled()


def test_sampler_of_a_training_run_reaches_its_grids(tmp_path):
    """genlab train sampler=heun: the grids sample with Heun (two evaluations a step); a GAN has no sampler."""
    from genlab.callbacks import SampleGrids
    from genlab.samplers import Heun

    t = make_trainer(["model=flow", "model.unet.width=8", "dataset=synthetic", "dataset.n=64", "trainer.batch_size=32",
                      "sampler=heun", "++trainer.sampling.steps=3"], tmp_path)
    (grids,) = [c for c in t.callbacks if isinstance(c, SampleGrids)]
    assert grids.settings["steps"] == 3 and isinstance(grids.settings["sampler"], Heun)
    calls = []
    t.model.unet.register_forward_hook(lambda *a: calls.append(1))
    grids.on_fit_start(t)
    grids.on_epoch_end(t)
    assert len(calls) == 5  # Heun: 2 a step, 1 on the last
    with pytest.raises(GenlabError, match="trainer.sampling.sampler is not a sampling setting of GAN"):
        make_trainer(["sampler=heun", "dataset=synthetic", "dataset.n=64"], tmp_path)
