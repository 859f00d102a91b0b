"""Sweeps through Hydra's launcher plugins (the `scale` extra): joblib on one machine, submitit (here its local
executor), a failing job in a sweep, and a job preempted by SIGUSR2 that submitit requeues."""

import os
import subprocess
import sys

import pytest

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
