"""Exact resume, safe checkpoint loading, interruption and divergence: each shown failing without its guard."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genlab import checkpoint
from genlab.errors import GenlabError

from conftest import genlab

COMMON = ["dataset=synthetic", "dataset.n=96", "trainer.batch_size=32", "device=cpu", "trainer.precision=fp32",
          "trainer.log_every=1", "trainer.n_samples=4"]


def tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


@pytest.mark.parametrize("model", ["gan", "vae"])
def test_resume_is_bit_identical(model, tmp_path):
    """4 steps + resume + 4 steps == 8 steps in one go (3 steps an epoch: the cut is mid-epoch)."""
    args = [f"model={model}", *COMMON]
    for name, extra in (("whole", ["trainer.max_steps=8"]), ("half", ["trainer.max_steps=4"])):
        r = genlab("train", *args, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = genlab("train", f"resume={tmp_path / 'half'}", "trainer.max_steps=8", f"hydra.run.dir={tmp_path / 'resumed'}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "resumed")
    assert a["step"] == b["step"] == 8
    ta, tb = dict(tensors({k: a[k] for k in ("model", "optimizers", "rng")})), dict(tensors({k: b[k] for k in ("model", "optimizers", "rng")}))
    assert ta.keys() == tb.keys() and len(ta) > 10
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different
    # and the 4-step run really differs from the 8-step one: the comparison can fail
    half = dict(tensors(checkpoint.load(tmp_path / "half")["model"]))
    assert any(not torch.equal(half[k], ta["/model" + k]) for k in half)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/genlab-poison-marker")


def test_poisoned_checkpoint_runs_nothing(tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "model": Payload()}, path)
    with pytest.raises(GenlabError, match="refused"):
        checkpoint.load(path)
    r = genlab("sample", f"ckpt={path}", cwd=tmp_path)
    assert r.returncode == 1 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not MARKER.exists()
    # the payload is live: unpickling it without weights_only would have run it
    with open(path, "rb") as fh:
        torch.load(fh, weights_only=False)
    assert MARKER.exists()
    MARKER.unlink()


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig, code):
    exe = Path(sys.executable).parent / "genlab"
    run = tmp_path / "run"
    p = subprocess.Popen([str(exe), "train", "model=dcgan", *COMMON, "dataset.n=2048", "trainer.epochs=1000",
                          f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert f"genlab train resume={run}" in err
    state = checkpoint.load(run)
    assert 0 < state["step"] < 1000 * 64


def test_old_periodic_checkpoints_are_pruned(tmp_path):
    r = genlab("train", "model=gan", *COMMON, "trainer.epochs=5", "trainer.keep_every=1", "trainer.keep_last=2",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "epoch_0004.pt")["step"] == 12
