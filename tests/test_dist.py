"""Data-parallel training under torchrun, on the CPU with gloo: what two processes compute, write and resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genlab import checkpoint, environment
from genlab.data import Loader
from genlab.parts import build_model

from conftest import genlab
from dist_worker import FAMILIES, PER_SAMPLE, family_config
from test_reliability import tensors

WORKER = Path(__file__).parent / "dist_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every family trained for a few steps by two processes and by one, with the draws and batch statistics
    arranged so that both compute the same global batch (dist_worker.py)."""
    out = tmp_path_factory.mktemp("dist")
    run([*TORCHRUN, str(WORKER), str(out), "--arranged"], out)
    run([*TORCHRUN, str(WORKER), str(out), "--arranged", "--accumulate"], out)
    run([sys.executable, str(WORKER), str(out), "--arranged"], out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_as_one(family, trained):
    """Both ranks end with identical weights (their gradients were averaged before every update), and those
    equal the one-process run of the same global batch up to the order of floating-point sums (SGD, 6 steps)."""
    alone = ranks_match_alone(trained, family, f"{family}-world2")
    # the comparison can fail: the weights moved far more than the tolerance from where they started
    cfg = family_config(family)
    torch.manual_seed(cfg.seed)
    start = build_model(cfg).state_dict()
    assert max((alone[k] - start[k]).abs().max().item() for k in start if start[k].is_floating_point()) > 1e-3


@pytest.mark.parametrize("family", PER_SAMPLE)
def test_two_processes_accumulating_micro_batches_train_as_one(family, trained):
    """trainer.accumulate=2 of batch 8 on two processes (micro-batches of 4 a rank, the gradients averaged over the
    ranks once a step) updates the weights as one process with batch 16 does."""
    ranks_match_alone(trained, family, f"{family}-world2-acc")


def ranks_match_alone(trained: Path, family: str, run: str) -> dict:
    """The two ranks of ``run`` hold identical weights, equal to the one-process run's up to the order of sums;
    returns the latter's."""
    rank0, rank1 = (torch.load(trained / f"{run}-rank{r}.pt") for r in (0, 1))
    alone = torch.load(trained / f"{family}-world1-rank0.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' weights differ"
    for k, v in alone.items():
        if v.is_floating_point():
            torch.testing.assert_close(rank0[k], v, atol=1e-5, rtol=1e-4, msg=f"{family}: {k}")
    return alone


def test_the_ranks_shard_each_batch():
    """Each rank takes its slice of the one-process batch: together the whole batch, apart nothing shared."""
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    labels = torch.arange(40)
    whole = Loader(images, labels, 8, seed=3)
    halves = [Loader(images, labels, 8, seed=3, rank=r, world=2) for r in (0, 1)]
    assert halves[0].steps_per_epoch == whole.steps_per_epoch == 5
    for b, b0, b1 in zip(whole.epoch(1), halves[0].epoch(1), halves[1].epoch(1)):
        assert b0.y.tolist() + b1.y.tolist() == b.y.tolist()
    with pytest.raises(Exception, match="multiple of 3"):
        Loader(images, labels, 8, rank=0, world=3)


def test_torchrun_writes_one_run_and_resumes_bit_exactly(tmp_path):
    """`torchrun -m genlab train`: one run directory, written by rank 0 alone; 4 steps + resume + 4 steps
    equal 8 steps in one go, bit for bit (weights, optimizer states), mid-epoch."""
    args = ["model=dcgan", "dataset=synthetic", "dataset.n=96", "trainer.batch_size=32", "trainer.precision=fp32",
            "trainer.log_every=1", "trainer.n_samples=4", "model.generator.width=8", "model.discriminator.width=8"]
    for name, extra in (("whole", ["trainer.max_steps=8"]), ("half", ["trainer.max_steps=4"])):
        run([*TORCHRUN, "-m", "genlab", "train", *args, *extra, f"hydra.run.dir={tmp_path / name}"], tmp_path)
    r = run([*TORCHRUN, "-m", "genlab", "train", f"resume={tmp_path / 'half'}", "trainer.max_steps=8",
             f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    assert r.stdout.count("genlab train: run directory") == 1  # rank 0 speaks for the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "resumed", "whole"]  # no stray directory of rank 1
    whole = tmp_path / "whole"
    assert sorted(p.name for p in whole.iterdir()) == [".hydra", "checkpoints", "env.json", "loss_curves.png",
                                                         "metrics.csv", "samples", "train.log"]
    env = environment.read(whole)  # written once, by rank 0, for the run of two processes
    assert env["processes"] == 2 and env["precision"] == "fp32" and "earlier" not in env
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["last.pt"]  # no temporary file of rank 1
    rows = (whole / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 8  # a row a step, once: not once per rank
    a, b = checkpoint.load(whole), checkpoint.load(tmp_path / "resumed")
    assert a["step"] == b["step"] == 8
    ta = dict(tensors({k: a[k] for k in ("model", "optimizers")}))
    tb = dict(tensors({k: b[k] for k in ("model", "optimizers")}))
    assert ta.keys() == tb.keys() and len(ta) > 10
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]
    half = dict(tensors(checkpoint.load(tmp_path / "half")["model"]))
    assert any(not torch.equal(half[k], ta["/model" + k]) for k in half)
    # in one process the run goes on, with a warning that it is no longer bit-identical
    r = genlab("train", f"resume={tmp_path / 'half'}", "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'alone'}",
               cwd=tmp_path)
    assert r.returncode == 0 and "trained on 2 process(es) and continues on 1" in r.stdout + r.stderr
    assert checkpoint.load(tmp_path / "alone")["step"] == 5


def test_a_sweep_inside_torchrun_is_refused(tmp_path):
    r = genlab("train", "-m", "seed=0,1", cwd=tmp_path, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert r.returncode != 0 and "cannot run inside torchrun" in r.stderr and "Traceback" not in r.stderr
    r = genlab("sample", "ckpt=x", cwd=tmp_path, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert r.returncode != 0 and "runs in one process" in r.stderr


def test_what_one_rank_meets_every_rank_decides(tmp_path):
    """A NaN batch, a spent time budget or a signal on rank 1 alone, or a stop asked by a callback of rank 0:
    both ranks act on it after the same step (on_nan=skip drops the same update, on_nan=stop diverges at the same
    row, the clock, the signal and the request end the run at the next metrics row) and stay identical; no rank
    waits forever for the other."""
    cases = ("skip", "stop", "clock", "signal", "request")
    run([*TORCHRUN, str(WORKER), str(tmp_path), "--decisions"], tmp_path)
    result = {(case, r): json.loads((tmp_path / f"{case}-rank{r}.json").read_text()) for case in cases for r in (0, 1)}
    for case in cases:
        a, b = result[case, 0], result[case, 1]
        assert a["step"] == b["step"] and a["history"] == b["history"], case
        assert a["weights"] == b["weights"] or case == "stop", case  # bit-identical weights
    assert result["skip", 0]["step"] == 8 and result["skip", 0]["error"] is None  # the bad update dropped, the run went on
    assert math.isfinite(result["skip", 0]["weights"])
    assert all("diverged" in result["stop", r]["error"] and "step 6" in result["stop", r]["error"] for r in (0, 1))
    assert result["clock", 0]["step"] == 4 and result["clock", 0]["error"] is None  # rank 1's clock, row at step 4
    assert result["signal", 0]["step"] == 4 and result["signal", 0]["error"].startswith("Interrupted: SIGTERM")
    assert "saved" in result["signal", 0]["error"] and (tmp_path / "signal" / "checkpoints" / "last.pt").is_file()
    assert checkpoint.load(tmp_path / "signal")["step"] == 4
    assert [result["request", r]["stopped"] for r in (0, 1)] == ["asked by a callback", "stopped by rank 0"]
    assert result["request", 0]["step"] == 4 and result["request", 0]["error"] is None


def test_a_rank_that_fails_stops_the_others(tmp_path):
    """Rank 1 fails mid-run (a callback of its own): rank 0 learns it at the next metrics row and stops with one
    line that carries rank 1's message, not a hang."""
    r = subprocess.run([*TORCHRUN, str(WORKER), str(tmp_path), "--crash"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "rank 1: GenlabError: rank 1 broke at step 3" in r.stderr
    assert "rank 0: PeerGone: process 1 of this run stopped (in a callback), so this one stops too: GenlabError: " \
           "rank 1 broke at step 3" in r.stderr  # its peer's own message


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_work_rank_0_does_alone_strands_no_rank(tmp_path):
    """Rank 0 alone sleeps past the collectives' timeout (GENLAB_DIST_TIMEOUT=3) in a callback's on_fit_start or
    while it builds the measurements (the first run's yardstick classifier): rank 1 waits for it, and both train to
    the end. It fails there, or writing a checkpoint (a full disk) at an epoch's end or mid-epoch: both ranks stop,
    rank 1 with rank 0's message, none stranded. Before, rank 1 waited in its next collective until the timeout
    (30 minutes under NCCL), or trained on alone."""
    r = subprocess.run([*TORCHRUN, str(WORKER), str(tmp_path), "--stranded"], cwd=tmp_path, capture_output=True,
                       env={**ENV, "GENLAB_DIST_TIMEOUT": "3"}, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = {(case, rank): json.loads((tmp_path / f"{case}-rank{rank}.json").read_text())
              for case in ("slow_start", "slow_build", "failed_start", "full_disk", "failed_step") for rank in (0, 1)}
    for case in ("slow_start", "slow_build"):
        assert [result[case, rank] for rank in (0, 1)] == [{"step": 8, "error": None}] * 2, case
    for case, message, step in (("failed_start", "tracker unreachable", 0), ("full_disk", "No space left", 4),
                                ("failed_step", "No space left", 4)):
        mine, theirs = result[case, 0], result[case, 1]
        assert mine["error"].startswith("OSError") and message in mine["error"], case
        assert theirs["error"].startswith("PeerGone: process 0 of this run stopped") and message in theirs["error"], case
        assert theirs["step"] == mine["step"] == step, case


@pytest.mark.parametrize("value,seconds", [(None, 1800.0), ("3", 3.0), ("abc", None), ("-1", None), ("0", None), ("inf", None)])
def test_the_collectives_timeout_is_seconds_above_zero(monkeypatch, value, seconds):
    from genlab import dist
    from genlab.errors import GenlabError

    if value is None:
        monkeypatch.delenv("GENLAB_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("GENLAB_DIST_TIMEOUT", value)
    if seconds is None:
        with pytest.raises(GenlabError, match=f"GENLAB_DIST_TIMEOUT={value}: the seconds a collective may wait"):
            dist.collective_timeout()
    else:
        assert dist.collective_timeout() == seconds
