"""Sweeps through Hydra's launcher plugins (the `scale` extra): joblib on one machine, submitit (here its local
executor), a failing job in a sweep, and a job preempted by SIGUSR2 that submitit requeues."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from genlab import checkpoint, schema
from genlab.config import CONFIG_DIR

from conftest import genlab, options

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


@pytest.mark.parametrize("launcher", options("launcher"))
def test_launcher_presets_compose(launcher):
    """launcher=X is hydra/launcher=X with genlab's settings: a requeued job resumes by itself (resume=auto), and on
    SLURM one rank per GPU."""
    schema.register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"launcher={launcher}"], return_hydra_config=True)
    assert cfg.resume == "auto"
    assert cfg.hydra.launcher._target_.endswith({"submitit_slurm": "SlurmLauncher", "submitit_local": "LocalLauncher"}[launcher])
    assert cfg.hydra.launcher.tasks_per_node == (cfg.hydra.launcher.gpus_per_node or 1)


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


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])
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
    assert "job #1 failed (" in r.stderr and "VAE takes a loss of type ELBO" in r.stderr and "Traceback" not in r.stderr
    assert "sweep of 3 jobs: 2 completed, 1 failed" in r.stdout
    # the failed job's own line once, not again inside all of the sweep's stderr held back and let out as one paragraph
    assert r.stderr.count("genlab train: error:") == 1, r.stderr
    if launcher == "joblib":  # each job's share of the CPUs, even where the environment asks for more threads
        cpus = len(os.sched_getaffinity(0))
        assert f"2 jobs at once on {cpus} CPUs, {max(1, cpus // 2)} torch thread(s) each" in (sweep / "0" / "train.log").read_text()


def submitit_sweep(tmp_path, *args) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "genlab"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(exe), "train", "-m", "launcher=submitit_local", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_a_submitit_sweep_completes_and_reports_a_failing_job(tmp_path):
    sweep = tmp_path / "sweep"
    p = submitit_sweep(tmp_path, *SMALL, "model=gan,vae", "loss=hinge", f"hydra.sweep.dir={sweep}")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1, err
    assert [(j["job"], j["status"]) for j in jobs(sweep)] == [("0", "completed"), ("1", "failed")]
    assert_whole(sweep / "0")
    assert "job #1 failed (" in err and "VAE takes a loss of type ELBO" in err and "Traceback" not in err


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_a_submitit_job_of_two_tasks_trains_as_one_run(tmp_path):
    """tasks_per_node=2 (one per GPU on a cluster): the job's tasks find each other through submitit's
    environment and train one run of two processes, whose files rank 0 alone writes."""
    sweep = tmp_path / "sweep"
    p = submitit_sweep(tmp_path, *SMALL, "model=gan", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert_whole(sweep / "0")
    log = (sweep / "0" / "train.log").read_text()
    assert "x 2 processes (gloo)" in log and log.count("done: 4 steps") == 1
    assert len(list(sweep.rglob("status.json"))) == 1


def holding(path: Path) -> int | None:
    """The process that has ``path`` open, from /proc."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:  # a process that ended, or is not ours
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the job's process in /proc")
def test_a_preempted_job_is_requeued_and_resumes_by_itself(tmp_path):
    """Job 0 gets SIGUSR2 (what SLURM sends before a time limit or a preemption) mid-run: genlab saves, submitit
    requeues it into the same run directory, resume=auto continues it, and it ends with the weights of job 1, the
    same run uninterrupted (keep_last, the only difference, changes no weight)."""
    sweep = tmp_path / "sweep"
    p = submitit_sweep(tmp_path, "model=gan", "dataset=synthetic", "dataset.n=2048", "trainer.batch_size=32",
                       "trainer.max_steps=200", "trainer.log_every=5", "trainer.progress=false", "trainer.precision=fp32",
                       "trainer.n_samples=4", "device=cpu", "trainer.keep_last=4,5", f"hydra.sweep.dir={sweep}")
    log, pid, deadline = sweep / "0" / "train.log", None, time.time() + 300
    while pid is None and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        pid = holding(log) if (sweep / "0" / "metrics.csv").exists() else None
    assert pid is not None, p.communicate()
    os.kill(pid, signal.SIGUSR2)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    text = log.read_text()
    saved = int(re.search(r"SIGUSR2: checkpoint saved at step (\d+)", text).group(1))
    assert f"resuming from {sweep / '0' / 'checkpoints' / 'last.pt'} at step {saved}" in text and 0 < saved < 200
    a, b = checkpoint.load(sweep / "0"), checkpoint.load(sweep / "1")
    assert a["step"] == b["step"] == 200
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow  # CI time: tests/test_travel.py races the link from 4 processes
def test_a_joblib_sweep_lands_with_its_verb_and_latest_links_one_of_its_jobs(tmp_path):
    """In genlab's own layout, a sweep of `genlab train` goes to outputs/train/multirun/DATE/TIME/N, and jobs
    running at once (joblib) leave outputs/train/latest a whole link to one of them, with no temporary link behind."""
    r = genlab("train", "-m", *SMALL, "model=gan", "seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    base = tmp_path / "outputs" / "train"
    jobs = sorted(base.glob("multirun/*/*/[0-9]"))
    assert len(jobs) == 4 and all((j / "env.json").is_file() for j in jobs)
    assert (base / "latest").resolve() in jobs and not list(base.glob(".latest.tmp*"))
    assert not (tmp_path / "outputs" / "multirun").exists()
