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


# gradient accumulation: the families that split their steps into micro-batches, small
ACCUMULATING = {
    "gan": ["model=gan"],
    "vae": ["model=vae", "model.encoder.width=8"],
    "ddpm": ["model=ddpm", "model.unet.width=8", "model.num_classes=10", "dataset.image_size=16"],
    "flow": ["model=flow", "model.unet.width=8", "dataset.image_size=16", "model.clip=null"],  # clipped, a gradient
    "edm": ["model=edm", "model.unet.width=8", "dataset.image_size=16", "model.clip=null"],    # 4x too large passes
    "vae_gan": ["model=vae_gan", "model.encoder.width=8", "model.discriminator.width=8"],
    "draem": ["model=draem", "dataset.image_size=16", "model.reconstructive.width=8", "model.discriminative.width=8"],
}


def running_statistics(model) -> None:
    """Batch norm normalising with its running statistics, as in eval mode, while its scale and shift still train:
    the only way a network with batch norm computes the same for a batch and for its micro-batches."""
    import torch.nn.functional as F
    from torch.nn.modules.batchnorm import _BatchNorm

    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.forward = lambda x, m=m: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def trained_weights(family: str, batch: int, accumulate: int, run_dir, steps: int = 3) -> dict:
    t = make_trainer([*ACCUMULATING[family], "dataset=synthetic", "dataset.n=128", "optimizer=sgd", "optimizer.lr=0.05",
                      f"trainer.batch_size={batch}", f"trainer.accumulate={accumulate}", f"trainer.max_steps={steps}",
                      "callbacks=none"], run_dir)
    running_statistics(t.model)
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    return start, {k: v.clone() for k, v in t.model.state_dict().items()}, t.history


@pytest.mark.parametrize("family", ACCUMULATING)
def test_accumulating_four_micro_batches_equals_one_batch_of_four_times_the_size(family, tmp_path):
    """trainer.accumulate=4 with batch 16 updates the weights as batch 64 does (SGD, 3 steps), up to the order of
    floating-point sums, and logs the same losses."""
    start, whole, rows = trained_weights(family, 64, 1, tmp_path / "whole")
    _, micro, micro_rows = trained_weights(family, 16, 4, tmp_path / "micro")
    moved = max((whole[k] - start[k]).abs().max().item() for k in start if start[k].is_floating_point())
    assert moved > 1e-3  # the comparison can fail: the weights moved far more than the tolerance
    for k, v in whole.items():
        if v.is_floating_point():
            torch.testing.assert_close(micro[k], v, atol=1e-5, rtol=1e-4, msg=f"{family}: {k}")
    for k in rows[-1]:  # the logged losses are the whole batch's means too
        if k.startswith("train/"):
            assert micro_rows[-1][k] == pytest.approx(rows[-1][k], rel=1e-4, abs=1e-6), k


def test_a_model_that_does_not_split_its_batch_says_so_once(tmp_path, caplog):
    from dist_worker import ACCUMULATE, family_config  # a plug-in model whose step takes the whole batch

    from genlab.build import build_trainer

    cfg = family_config("two_updates", ACCUMULATE)
    t = build_trainer(cfg, tmp_path, torch.device("cpu"))
    assert t.loader.batch_size == 16  # the step's batch: batch_size x accumulate
    with caplog.at_level("WARNING"):
        t.fit()
    said = [r for r in caplog.records if "does not split its batch" in r.getMessage()]
    assert len(said) == 1 and "computes its 16 images at once" in said[0].getMessage()


def test_accumulate_is_a_whole_number_and_fixed_on_resume(tmp_path):
    from genlab.train import FIXED, check_trainer

    from conftest import compose_train

    with pytest.raises(GenlabError, match="trainer.accumulate must be a whole number above 0"):
        check_trainer(compose_train(["trainer.accumulate=0"]).trainer)
    assert "trainer.accumulate" in FIXED  # a resume may not change the batch a step sees


def _mark_many(base, names):
    from genlab import runs

    for name in names:
        runs.mark_latest(base / name, "train")


def test_latest_links_the_newest_run_of_each_verb_whole_under_concurrent_jobs(tmp_path, monkeypatch):
    import multiprocessing
    import os

    from genlab import runs

    monkeypatch.chdir(tmp_path)
    base = tmp_path / "outputs" / "train"
    names = [f"multirun/d/t/{i}" for i in range(40)]
    for name in ["a", "b", *names]:
        (base / name).mkdir(parents=True)
    assert runs.mark_latest(base / "a", "train") == base / "latest"
    runs.mark_latest(base / "b", "train")
    assert (base / "latest").resolve() == base / "b" and os.readlink(base / "latest") == "b"  # relative: it moves along
    assert runs.mark_latest(tmp_path / "elsewhere", "train") is None  # hydra.run.dir outside the layout
    ctx = multiprocessing.get_context("fork")  # jobs of a sweep starting together (joblib, submitit)
    procs = [ctx.Process(target=_mark_many, args=(base, names[i::4])) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert os.readlink(base / "latest") in names and not list(base.glob(".latest.tmp*"))


def test_a_run_and_a_sweep_in_the_default_layout(tmp_path):
    small = ["model=gan", "dataset=synthetic", "dataset.n=64", "trainer.batch_size=32", "trainer.max_steps=1",
             "callbacks=none"]
    r = genlab_here("train", *small, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    latest = tmp_path / "outputs" / "train" / "latest"
    assert (latest / "env.json").is_file() and latest.resolve().parent.parent == latest.parent
    r = genlab_here("train", "-m", *small, "seed=0,1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    jobs = sorted((tmp_path / "outputs" / "train" / "multirun").glob("*/*/[01]"))
    assert len(jobs) == 2 and latest.resolve() in jobs  # a sweep of train lies with train's runs


def test_a_run_from_before_accumulate_keeps_its_batch_on_resume():
    """A checkpoint whose config has no trainer.accumulate trained with 1: a resume may not change it (the step's
    batch, and so where each step falls in its epoch), and a resume that leaves it alone goes on with 1."""
    from omegaconf import OmegaConf

    from genlab.train import resumed_config

    from conftest import compose_train

    stored = OmegaConf.to_container(compose_train(["model=gan"]), resolve=True)
    del stored["trainer"]["accumulate"]
    with pytest.raises(GenlabError, match="trainer.accumulate"):
        resumed_config(stored, compose_train(["model=gan", "trainer.accumulate=4"]), ["trainer.accumulate=4"])
    assert resumed_config(stored, compose_train(["model=gan"]), []).trainer.accumulate == 1
