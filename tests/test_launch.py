"""Sweeps through Hydra's launcher plugins (the `scale` extra): joblib on one machine, submitit (here its local
executor), a failing job in a sweep, and a job preempted by SIGUSR2 that submitit requeues."""

import csv
import json
import os
import subprocess
import sys

import pytest

from genlab import checkpoint

from conftest import genlab

SMALL = ["dataset=synthetic", "dataset.n=64", "trainer.batch_size=32", "trainer.max_steps=4", "trainer.progress=false",
         "trainer.precision=fp32", "trainer.n_samples=4", "device=cpu"]


def hide_plugins(tmp_path) -> dict:
    """An environment in which Hydra's plugins are not installed: a package hydra_plugins with nothing in it comes
    first on the path."""
    (tmp_path / "hidden" / "hydra_plugins").mkdir(parents=True, exist_ok=True)
    (tmp_path / "hidden" / "hydra_plugins" / "__init__.py").write_text("")
    return {"PYTHONPATH": str(tmp_path / "hidden")}


@pytest.mark.parametrize("choice", ["hydra/launcher=joblib", "hydra/launcher=submitit_slurm",
                                    "hydra/launcher=submitit_local"])
def test_a_launcher_without_its_plugin_names_the_extra(tmp_path, choice):
    r = genlab("train", "-m", choice, *SMALL, cwd=tmp_path, env=hide_plugins(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"genlab train: error: {choice} needs "
                                f"{'hydra-joblib-launcher' if 'joblib' in choice else 'hydra-submitit-launcher'}, "
                                "which is not installed: pip install 'genlab[scale]'")
    # the plugins really are hidden there
    r = subprocess.run([sys.executable, "-c", "import hydra_plugins.hydra_joblib_launcher"], cwd=tmp_path,
                       env={**os.environ, **hide_plugins(tmp_path)}, capture_output=True)
    assert r.returncode == 1 and b"ModuleNotFoundError" in r.stderr


def jobs(sweep_dir) -> list[dict]:
    with open(sweep_dir / "jobs.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_whole(run_dir, steps=4):
    """A run directory with everything a finished run writes."""
    for f in ("checkpoints/last.pt", "metrics.csv", "loss_curves.png", "samples/epoch_0002.png", "train.log",
              ".hydra/config.yaml", "status.json"):
        assert (run_dir / f).is_file(), f
    assert checkpoint.load(run_dir)["step"] == steps
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failing_job_is_reported_and_the_others_complete(tmp_path, launcher):
    """model=vae with loss=hinge is refused; the GAN and the DCGAN of the same sweep complete, every run directory
    whole, and the sweep says which job failed and why, with exit status 1. Under joblib, 2 jobs at once."""
    sweep = tmp_path / "sweep"
    r = genlab("train", "-m", f"hydra/launcher={launcher}", *SMALL, "model=gan,vae,dcgan", "loss=hinge",
               *(["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []), f"hydra.sweep.dir={sweep}", cwd=tmp_path,
               env={"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))})
    assert r.returncode == 1, r.stderr
    assert [(j["job"], j["status"]) for j in jobs(sweep)] == [("0", "completed"), ("1", "failed"), ("2", "completed")]
    assert_whole(sweep / "0")
    assert_whole(sweep / "2")
    assert f"job #1 failed (" in r.stderr and "VAE takes a loss of type ELBO" in r.stderr and "Traceback" not in r.stderr
    assert "sweep of 3 jobs: 2 completed, 1 failed" in r.stdout
    if launcher == "joblib":  # each job's share of the CPUs, even where the environment asks for more threads
        cpus = len(os.sched_getaffinity(0))
        assert f"2 jobs at once on {cpus} CPUs, {max(1, cpus // 2)} torch thread(s) each" in (sweep / "0" / "train.log").read_text()


def test_a_sweep_that_goes_well_exits_0(tmp_path):
    r = genlab("train", "-m", *SMALL, "model=gan", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [j["status"] for j in jobs(tmp_path / "s")] == ["completed", "completed"]
