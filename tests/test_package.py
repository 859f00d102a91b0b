"""genlab as a user installs it: a wheel in a fresh virtual environment with no checkout on the path, run
from an empty folder, with the examples/ plug-in; samples written as PNG files and read back; a folder
of images measured with evaluate samples=DIR."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from genlab.images import read_images, to_uint8, write_pngs
from genlab.parts import build_model
from genlab.sampling import draw

from conftest import compose_train, genlab

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dataset=synthetic", "dataset.n=64", "trainer.batch_size=32", "trainer.max_steps=2", "device=cpu",
         "trainer.n_samples=4"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtual environment with genlab installed from a wheel built from this checkout; its dependencies
    (torch and the rest) are this environment's, reached through a .pth file, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info",
                                                             "__pycache__", "tests", "docs", "scripts"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp / "dist").glob("genlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("genlab/configs/") for n in names if n.endswith(".yaml")}
    assert shipped == {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    # the Optuna sweeper, in Hydra's namespace package for plugins (which has no __init__.py of its own)
    assert "hydra_plugins/genlab_optuna_sweeper/optuna_sweeper.py" in names and "hydra_plugins/__init__.py" not in names
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    packages = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    Path(site, "dependencies.pth").write_text("\n".join(packages) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return env


def run(env: Path, *args, cwd: Path, extra_env=None):
    """A command of the wheel's environment, from ``cwd``, with no PYTHONPATH."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    clean["PATH"] = f"{env / 'bin'}:{clean['PATH']}"
    clean.update(extra_env or {})
    return subprocess.run(list(args), cwd=cwd, env=clean, capture_output=True, text=True, timeout=600)


def test_the_wheel_trains_samples_and_evaluates_from_an_empty_folder(venv, tmp_path):
    where = run(venv, "python", "-c", "import genlab, genlab.cli; print(genlab.__file__, genlab.cli.CONFIG_DIR)",
                cwd=tmp_path)
    assert where.returncode == 0 and str(ROOT) not in where.stdout and str(venv) in where.stdout, where.stdout
    r = run(venv, "genlab", "--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("genlab ")
    r = run(venv, "genlab", "train", "--help", cwd=tmp_path)
    models = ", ".join(sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")))
    assert r.returncode == 0 and f"model: {models}" in r.stdout, "the wheel does not ship every model config"
    r = run(venv, "genlab", "-sc", "query=bash", cwd=tmp_path, extra_env={"COMP_LINE": "genlab train model=dd"})
    assert r.returncode == 0 and "model=ddpm" in r.stdout, r.stderr  # completion reads the packaged configs
    r = run(venv, "genlab", "train", "model=vae", "dataset.classes=[0]", *SMALL, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run(venv, "genlab", "sample", "ckpt=run", "n=10", "format=png", "hydra.run.dir=s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "s" / "samples").glob("*.png"))
    assert [f.name for f in files[:2]] == ["000000.png", "000001.png"] and len(files) == 10
    images = [torchvision.io.decode_image(str(f)) for f in files]  # what torch-fidelity and friends read
    assert all(x.shape == (1, 28, 28) and x.dtype == torch.uint8 for x in images)
    arrays = np.load(tmp_path / "s" / "samples.npz")
    assert arrays["images"].shape == (10, 28, 28, 1) and np.array_equal(arrays["images"][0, ..., 0], images[0][0].numpy())
    r = run(venv, "genlab", "evaluate", "ckpt=run", "hydra.run.dir=e", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e" / "report.json").read_text())["normal_classes"] == [0]
    r = run(venv, "genlab", "report", "run", cwd=tmp_path)  # its page template is in the wheel
    assert r.returncode == 0 and "ROC curve" in (tmp_path / "run" / "report.html").read_text(), r.stderr
    api = ("import genlab.api as gl; x, y = gl.sample('run', n=3); "
           "print(tuple(x.shape), gl.compose('train', ['model=ddpm']).model._target_)")
    r = run(venv, "python", "-c", api, cwd=tmp_path)
    assert r.returncode == 0 and "(3, 1, 28, 28) genlab.models.DDPM" in r.stdout, r.stderr


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_the_example_plugin_from_its_own_folder(venv, tmp_path):
    """The user's own model, loss and configs: --config-dir for the configs, the current folder for the modules."""
    plugin = tmp_path / "plugin"
    shutil.copytree(ROOT / "examples" / "plugin", plugin)
    r = run(venv, "genlab", "train", "--config-dir", "configs", "experiment=toy_cond", *SMALL, "hydra.run.dir=run",
            cwd=plugin)
    assert r.returncode == 0, r.stderr
    r = run(venv, "genlab", "sample", "ckpt=run", "labels=[3,7]", "temperature=0.5", "hydra.run.dir=s", cwd=plugin)
    assert r.returncode == 0, r.stderr
    assert torch.load(plugin / "s" / "samples.pt", weights_only=True).shape == (2, 1, 28, 28)
    r = run(venv, "genlab", "train", "--config-dir", "configs", "model=gan", "loss=user_softplus", *SMALL,
            "hydra.run.dir=run2", cwd=plugin)
    assert r.returncode == 0, r.stderr
    # a subclass of genlab's GAN whose constructor passes **kwargs on: it takes genlab's loss
    r = run(venv, "genlab", "train", "--config-dir", "configs", "model=tiny_gan", "loss=hinge", *SMALL,
            "hydra.run.dir=run3", cwd=plugin)
    assert r.returncode == 0, r.stderr
    r = run(venv, "genlab", "train", "--config-dir", "configs", "model=tiny_gan", "loss=elbo", *SMALL, cwd=plugin)
    assert r.returncode == 1 and "TinyGAN takes a loss of type GANLoss" in r.stderr, r.stderr
    r = run(venv, "genlab", "train", "model._target_=toy_cond.Missing", *SMALL, cwd=tmp_path)
    assert r.returncode == 1 and "cannot import toy_cond.Missing" in r.stderr and "current directory" in r.stderr


def test_the_wheel_searches_with_its_optuna_sweeper(venv, tmp_path):
    """Hydra finds hydra/sweeper=optuna in the installed wheel by itself; a preset's search of one trial runs."""
    pytest.importorskip("optuna", reason="the search needs genlab[scale] (optuna)")
    found = ("from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
             "print([p.__module__ for p in Plugins.instance().discover(Sweeper)])")
    r = run(venv, "python", "-c", found, cwd=tmp_path)
    assert r.returncode == 0 and "hydra_plugins.genlab_optuna_sweeper.optuna_sweeper" in r.stdout, r.stdout + r.stderr
    r = run(venv, "genlab", "train", "hparams_search=vae_digits", "hydra.sweeper.n_trials=1", "model.encoder.width=8",
            *SMALL[2:], "trainer.progress=false", "hydra.sweep.dir=search", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "search" / "trials.csv").read_text().splitlines()[1].startswith("0,COMPLETE,")


def test_samples_drawn_in_batches_written_and_read_back(tmp_path, caplog):
    """n images in batches of batch_size, the same for a seed; a folder written twice holds only the second
    set; a sample run directory reads as its samples/ folder (not grid.png); another colour mode is converted
    with a warning."""
    model = build_model(compose_train(["model=dcgan"])).eval()
    x, labels = draw(model, n=10, batch_size=4, compile="false", precision="fp32")
    again, _ = draw(model, n=10, batch_size=4, compile="false", precision="fp32", seed=0)
    assert x.shape == (10, 1, 28, 28) and labels is None and torch.equal(x, again)
    assert 0 <= x.min() and x.max() <= 1
    write_pngs(x, tmp_path / "samples")
    write_pngs(x[:3], tmp_path / "samples")
    Image.new("L", (28, 28)).save(tmp_path / "grid.png")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert torch.equal(read_images(tmp_path, 1, 28), to_uint8(x[:3]))
    Image.new("RGB", (28, 28), (255, 0, 0)).save(tmp_path / "samples" / "000003.png")
    assert read_images(tmp_path, 1, 28).shape == (4, 1, 28, 28) and "converting" in caplog.text


def test_evaluate_refuses_a_checkpoint_with_a_folder_or_a_dataset(tmp_path):
    r = genlab("evaluate", "task=quality", "ckpt=run", "samples=s", cwd=tmp_path)
    assert r.returncode == 1 and "not both" in r.stderr
    r = genlab("evaluate", "task=quality", "ckpt=run", "dataset=mnist", cwd=tmp_path)
    assert r.returncode == 1 and "the run's own dataset" in r.stderr
