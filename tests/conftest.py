"""Shared fixtures: the real configs composed with tiny CPU-only overrides, and small on-disk datasets."""

import contextlib
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from genlab import schema
from genlab.build import build_trainer
from genlab.config import CONFIG_DIR

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):  # tests run side by side (pytest -n 2): a core each, for the
    os.environ["OMP_NUM_THREADS"] = "1"    # commands they start too, or they slow each other several-fold
    torch.set_num_threads(1)
TINY = ["device=cpu", "trainer.progress=false", "trainer.precision=fp32"]


def options(group: str) -> list[str]:
    """The names a config group offers on the command line (its YAML files)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides=()):
    schema.register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[*TINY, *overrides])


def make_trainer(overrides, run_dir, seed=0):
    """The Trainer `genlab train` would build for these overrides (CPU, fp32, no progress bar), writing into run_dir."""
    cfg = compose_train(overrides)
    torch.manual_seed(seed)
    return build_trainer(cfg, run_dir, torch.device("cpu"))


def first_batch(trainer):
    return next(trainer.loader.epoch(0))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """genlab's cache, one per test process; its classifiers (the FID yardsticks) shared by the session's
    processes, so each is trained once (classifier_for locks while it trains) and not once per process."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    if os.environ.get("PYTEST_XDIST_WORKER") and not (cache / "classifiers").exists():
        shared = tmp_path_factory.getbasetemp().parent / "classifiers"
        shared.mkdir(exist_ok=True)
        cache.mkdir(exist_ok=True)
        (cache / "classifiers").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("GENLAB_CACHE", str(cache))


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's idx format: big-endian magic, dimensions, then uint8 data."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, h, w) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def fake_images(n, h, w, c=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, c * h * w)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    """A dataset root with tiny MNIST, Fashion-MNIST and CIFAR-10 files in torchvision's layout."""
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        for prefix, n in (("train", 96), ("t10k", 40)):
            write_idx(root / name / "raw", prefix, *fake_images(n, 28, 28, seed=n))
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i, f in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels = fake_images(20, 32, 32, c=3, seed=100 + i)
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": data, "labels": labels.tolist()}, fh)
    return root


def genlab_here(*args, cwd) -> subprocess.CompletedProcess:
    """`genlab ARGS...` run in this process, through the console script's own entry (genlab.cli:main): for the
    commands that are refused before or as they start, where a new interpreter (3 s of imports) would be most of the
    test. What the command configured for itself (logging, Hydra's run config, the working folder, sys.argv) is
    put back afterwards."""
    from hydra.core.hydra_config import HydraConfig

    from genlab import cli

    root, saved = logging.getLogger(), (logging.getLogger().handlers[:], logging.getLogger().level, sys.argv[:])
    full_error, here = os.environ.pop("HYDRA_FULL_ERROR", None), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        for handler in [h for h in root.handlers if h not in saved[0]]:
            root.removeHandler(handler)
            handler.close()
        root.handlers[:], sys.argv = saved[0], saved[2]
        root.setLevel(saved[1])
        HydraConfig.instance().cfg = None
        if full_error is not None:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return subprocess.CompletedProcess(["genlab", *args], code, out.getvalue(), err.getvalue())


def genlab(*args, cwd, env=None, timeout=600):
    """Run the real `genlab` command in a subprocess; ``env`` adds to the environment (None: removes)."""
    exe = Path(sys.executable).parent / "genlab"
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: removed
    return subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


class StepRecorder:
    """A stand-in for the step context (genlab.step.StepContext) of a model's ``training_step``, for a loss computed
    by hand: the batch in one piece, no optimizer; every loss given to ``backward`` is kept in ``losses``."""

    share, step_index = 1.0, 0

    def __init__(self):
        self.losses = []

    autocast = staticmethod(contextlib.nullcontext)

    def chunks(self, *tensors):
        yield tensors

    def tally(self, out, **losses):
        out.update({k: v.detach() for k, v in losses.items()})
        return out

    def backward(self, loss, name=None, retain_graph=False):
        self.losses.append(loss)

    def clip(self, name, max_norm):
        pass

    def step(self, name):
        pass
