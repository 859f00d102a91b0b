"""The real `genlab` command, in a subprocess: the files a run writes, sweeps, resume, and errors."""

import csv

import pytest
import torch
import yaml

from genlab import checkpoint

from conftest import SHARED_DATA, genlab, genlab_here, options

FAST = ["dataset=synthetic", "dataset.n=128", "trainer.batch_size=32", "trainer.log_every=2",
        "trainer.n_samples=16", "trainer.precision=fp32", "device=cpu"]


def test_help_and_version(tmp_path):
    r = genlab("--help", cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout
    r = genlab("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("genlab ")
    r = genlab("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and f"model: {', '.join(options('model'))}" in r.stdout  # read from configs/model
    r = genlab("--help", cwd=tmp_path)
    assert all(f"  {verb} " in r.stdout for verb in ("train", "sample", "evaluate", "predict", "report"))
    r = genlab("fly", cwd=tmp_path)
    assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.mark.parametrize("line,expected", [("genlab sa", "sample"), ("genlab sample ", "ckpt="),
                                           ("genlab train trainer.ep", "trainer.epochs=")])
def test_shell_completion(tmp_path, line, expected):
    r = genlab("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line})
    assert r.returncode == 0 and expected in r.stdout, r.stderr


def test_train_writes_the_run_directory(tmp_path):
    r = genlab("train", "model=gan", "trainer.epochs=2", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = [p for p in (tmp_path / "outputs" / "train").glob("*/*") if p.parent.name != "latest"]
    assert len(runs) == 1
    run = runs[0]
    assert (tmp_path / "outputs" / "train" / "latest").resolve() == run.resolve()  # the newest run of train
    assert r.stdout.strip().splitlines()[-1].endswith(str(run.relative_to(tmp_path)))
    for f in ("checkpoints/last.pt", "samples/epoch_0001.png", "samples/epoch_0002.png", "metrics.csv",
              "loss_curves.png", ".hydra/config.yaml", ".hydra/overrides.yaml", "train.log"):
        assert (run / f).is_file(), f
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "epoch", "train/loss_d", "train/loss_g", "img_per_s", "wall_time"]
    assert int(rows[-1]["step"]) == 8 and int(rows[-1]["epoch"]) == 2
    assert all(float(r["img_per_s"]) > 0 for r in rows)
    state = checkpoint.load(run)
    assert state["step"] == 8 and state["config"]["model"]["_target_"] == "genlab.models.GAN"
    assert set(state["optimizers"]) == {"g", "d"} and state["version"] == checkpoint.VERSION


def test_sweep_with_multirun(tmp_path):
    r = genlab("train", "-m", "model=gan", "optimizer.lr=1e-4,1e-3", "trainer.max_steps=2", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = sorted((tmp_path / "outputs" / "train" / "multirun").glob("*/*/*/checkpoints/last.pt"))
    assert len(runs) == 2
    assert "sweep of 2 jobs: 2 completed;" in r.stdout and (runs[0].parents[2] / "jobs.csv").is_file()
    lrs = [checkpoint.load(p)["config"]["optimizer"]["lr"] for p in runs]
    assert lrs == [1e-4, 1e-3]


def test_resume_continues_the_run(tmp_path):
    first = tmp_path / "first"
    r = genlab_here("train", "model=vae", "trainer.epochs=1", *FAST, f"hydra.run.dir={first}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("train", f"resume={first}", "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = checkpoint.load(tmp_path / "second")
    assert state["step"] == 8 and state["config"]["model"]["_target_"] == "genlab.models.VAE"
    with open(tmp_path / "second" / "metrics.csv") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert steps == sorted(steps) and steps[0] < 4 < steps[-1] == 8  # the first run's rows, then more
    assert (first / "checkpoints" / "last.pt").is_file()  # nothing of the first run was touched
    r = genlab_here("train", f"resume={first}", "model=gan", cwd=tmp_path)
    assert r.returncode == 1 and "resume=" in r.stderr
    assert "would change model (the run has vae, this command gan)" in r.stderr
    r = genlab_here("train", f"resume={tmp_path / 'second'}", "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'third'}",
                    cwd=tmp_path)
    assert r.returncode == 0 and "nothing to train: the run in" in r.stdout + r.stderr
    assert not (tmp_path / "third" / "checkpoints").exists()


@pytest.mark.parametrize("args,message", [
    (["dataset=mnist", "dataset.download=false", "dataset.root=nowhere"], "Dataset 'mnist' was not found"),
    (["model=no_such_model"], "Could not find 'model/no_such_model'"),
    (["loss=nope"], "Could not find 'loss/nope'"),
    (["model=vae", "loss=hinge"], "loss=hinge does not fit"),
    (["dataset.image_size=30"], "multiple of 4"),
    (["trainer.no_such_key=1"], "Could not override 'trainer.no_such_key'"),
    (["dataset=synthetic", "dataset.classes=[99]"], "selects no training image"),
    (["resume=no/such/run"], "checkpoint not found"),
    (["trainer.epochs=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["trainer.progress=maybe"], "Value 'maybe' is not a valid bool"),
    (["trainer.batch_size=0"], "trainer.batch_size must be a whole number above 0"),
    (["trainer.on_nan=ignore"], "trainer.on_nan=ignore is not one of stop, skip"),
    (["+model.latent=3"], "model.latent is not a setting of GAN"),
    (["+trainer.epoch=3"], "trainer.epoch is not a setting of genlab train"),
    (["model.generator.z_dim=abc"], "model.generator.z_dim must be int; got 'abc'"),
    (["model=vae", "loss.beta=high"], "loss.beta must be float; got 'high'"),
    (["optimizer.lr=fast"], "optimizer.lr must be float; got 'fast'"),
    (["+optimizer.nets.d.momentum=0.9"], "optimizer.nets.d.momentum is not a setting of Adam"),
    (["dataset=synthetic", "dataset.n=many"], "dataset.n must be int; got 'many'"),
    (["dataset=folder"], "genlab train needs a value for dataset.root"),
    (["+loss.n_critic=5"], "loss.n_critic is not a setting of BCE; its settings are: gp_weight."),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    r = genlab_here("train", *args, "trainer.max_steps=1", "device=cpu", cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_sample_without_a_checkpoint(tmp_path):
    r = genlab_here("sample", cwd=tmp_path)
    assert r.returncode == 1 and "genlab sample needs a value for ckpt" in r.stderr and "Traceback" not in r.stderr


def test_full_traceback_on_request(tmp_path):
    r = genlab("train", "model=vae", "loss=hinge", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_foreign_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    r = genlab_here("train", f"resume={tmp_path / 'other.pt'}", cwd=tmp_path)
    assert r.returncode == 1 and "not a genlab checkpoint" in r.stderr


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not in ../shared/data")
def test_short_run_on_real_mnist(tmp_path):
    r = genlab("train", "model=gan", "dataset=mnist", f"dataset.root={SHARED_DATA}", "dataset.download=false",
               "trainer.max_steps=60", "trainer.log_every=20", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((tmp_path / "run" / ".hydra" / "config.yaml").read_text())
    assert cfg["dataset"]["root"] == str(SHARED_DATA)
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert int(rows[-1]["step"]) == 60
    # after 60 steps the generator has moved away from its initial near-constant output
    state = checkpoint.load(tmp_path / "run")
    assert state["step"] == 60
