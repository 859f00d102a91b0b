"""Runs that travel (issue 36): the best checkpoint kept beside the last, and gradient accumulation."""

import pytest
import torch

from genlab import checkpoint
from genlab.callbacks import Callback, Checkpoints
from genlab.errors import GenlabError

from conftest import genlab_here, make_trainer

COMMON = ["dataset=synthetic", "dataset.n=96", "trainer.batch_size=32", "device=cpu", "trainer.precision=fp32",
          "trainer.log_every=1", "trainer.n_samples=4"]


class Scripted(Callback):
    """Overwrites the measured ``metric`` of each epoch's row with the next of ``values``: a metric that peaks mid-run."""

    def __init__(self, metric: str, values: list[float]):
        self.metric, self.values = metric, list(values)

    def on_log(self, trainer, row):
        if self.metric in row:
            row[self.metric] = self.values.pop(0)


def test_best_checkpoint_keeps_the_peak_and_resume_takes_last(tmp_path):
    run = tmp_path / "run"
    t = make_trainer(["model=vae", *COMMON, "trainer.max_steps=12", "trainer.best=val/loss"], run)
    assert type(t.callbacks[0]).__name__ == "Evaluation"  # measured for it, without evaluation.metrics
    t.callbacks.insert(1, Scripted("val/loss", [5.0, 2.0, 3.0, 4.0]))  # lowest after epoch 2 (step 6)
    t.fit()
    best, last = checkpoint.load(run / "checkpoints" / "best.pt"), checkpoint.load(run)
    assert best["best"] == {"metric": "val/loss", "value": 2.0, "step": 6} and best["step"] == 6
    assert last["step"] == 12 and last["callbacks"]["checkpoints"]["best"]["step"] == 6
    assert any(not torch.equal(v, last["model"][k]) for k, v in best["model"].items())  # step 6's weights, not 12's
    assert t.saved[0].name == "last.pt"  # a divergence's message points at the last good checkpoint, not the best
    # a resume goes on from last.pt, and its best so far carries over: a worse value writes no new best.pt
    r = genlab_here("train", f"resume={run}", "trainer.max_steps=15", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {run / 'checkpoints' / 'last.pt'} at step 12" in r.stdout + r.stderr
    assert checkpoint.load(run)["step"] == 15
    kept = checkpoint.load(run / "checkpoints" / "best.pt")["best"]
    assert kept["step"] in (6, 15)  # the resumed run measured val/loss itself at step 15
    assert kept["step"] == 6 or kept["value"] < 2.0


def test_best_follows_the_metrics_direction(tmp_path):
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=1", "callbacks=none"], tmp_path)
    for metric, values, best in (("eval/auroc", [0.5, 0.7, 0.6], 0.7), ("eval/fid", [30.0, 20.0, 25.0], 20.0),
                                 ("train/loss_d", [1.0, float("nan"), 0.5], 0.5)):
        saver = Checkpoints(tmp_path / metric.replace("/", "_"), {}, best=metric)
        for step, v in enumerate(values):
            t.step = step
            saver.on_log(t, {metric: v})
        assert saver.best_so_far == {"metric": metric, "value": best, "step": values.index(best)}
        assert checkpoint.load(saver.dir / "best.pt")["best"]["value"] == best


def test_best_names_a_metric_of_the_rows(tmp_path):
    with pytest.raises(GenlabError, match="trainer.best=fid is not a metric"):
        make_trainer(["model=gan", *COMMON, "trainer.best=fid"], tmp_path)
