"""Hyperparameter search: the in-loop measurements a search optimizes (genlab.search), the search space of
hydra/sweeper=optuna, and searches through the real command: one that completes and is continued on its
storage, one made to prune, two joblib workers on one study, workers killed in a search, and the line printed
without Optuna."""

import csv
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from genlab import checkpoint, schema, search
from genlab.config import CONFIG_DIR
from genlab.errors import GenlabError
from genlab.parts import build_model
from genlab.parts import test_split as split_of

from conftest import TINY, compose_train, genlab, make_trainer, options

optuna = pytest.importorskip("optuna", reason="the search needs genlab[scale] (optuna)")
from hydra_plugins.genlab_optuna_sweeper.optuna_sweeper import OptunaSweeper  # noqa: E402

# small VAE trials on the offline default data (digits): 4 steps an epoch
TRIAL = ["model=vae", "model.encoder.width=8", "model.encoder.latent_dim=4", "dataset.classes=[0,1]",
         "trainer.batch_size=64", "trainer.progress=false", "trainer.precision=fp32", "trainer.n_samples=4",
         "trainer.keep_every=0", "device=cpu"]
SEARCH = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.objective=val/loss", "hydra.sweeper.sampler.seed=0",
          "optimizer.lr=tag(log, interval(1e-4, 1e-2))"]


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def sweeper(**settings) -> OptunaSweeper:
    s = OptunaSweeper(**{"objective": "val/loss", "direction": None, "n_trials": 1, "n_jobs": 1,
                         "study_name": "s", "storage": None, "sampler": None, "pruner": None, "params": {}, **settings})
    s.config = OmegaConf.create({"hydra": {"job": {"name": "train"}}})
    return s


def space_of(params: dict, arguments=()):
    s = sweeper(params=params)
    return s.search_space(OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]
                                                                  + list(arguments)))


def test_the_search_space_in_hydra_optuna_sweeper_syntax(capsys):
    D = optuna.distributions
    space, fixed = space_of({"optimizer.lr": "tag(log, interval(1e-5, 1e-2))", "a": "interval(0, 1)",
                             "b": "int(interval(1, 8))", "c": "range(1, 5)", "d": "range(0.1, 0.5, 0.1)",
                             "optimizer.betas": "choice([0.5,0.999], [0.0,0.9])", "model": "vae,dcgan",
                             "+optimizer.nets.d.lr": "choice(1e-3, 2e-3)", "seed": "3"},
                            ["a=0.5", "model=gan,vae", "trainer.epochs=2"])
    assert space == {"optimizer.lr": D.FloatDistribution(1e-5, 1e-2, log=True), "b": D.IntDistribution(1, 8),
                     "c": D.IntDistribution(1, 4),  # range's stop is excluded, as in Hydra
                     "d": D.FloatDistribution(0.1, 0.4, step=0.1),
                     "optimizer.betas": D.CategoricalDistribution(["[0.5,0.999]", "[0.0,0.9]"]),
                     "+optimizer.nets.d.lr": D.CategoricalDistribution([1e-3, 2e-3]),
                     "model": D.CategoricalDistribution(["gan", "vae"])}  # the command line's sweep replaces it
    assert fixed == ["seed=3", "a=0.5", "trainer.epochs=2"]  # a plain value on the command line fixes a dimension
    for bad, message in (("range(3, 1)", "the range is empty"), ("tag(log, interval(0, 1))", "low > 0")):
        with pytest.raises(SystemExit):
            space_of({"x": bad})
        assert message in capsys.readouterr().err
    for objective in (None, "eval/nope"):  # checked before anything is launched
        with pytest.raises(SystemExit):
            sweeper(objective=objective).sweep([])
        assert f"hydra.sweeper.objective={objective or 'null'}: name the metric" in capsys.readouterr().err


@pytest.mark.parametrize("preset", options("hparams_search"))
def test_every_preset_composes_into_a_search(preset):
    schema.register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"hparams_search={preset}"], return_hydra_config=True)
    s = cfg.hydra.sweeper
    assert s._target_.endswith("OptunaSweeper") and s.study_name == preset
    space, fixed = space_of(dict(s.params))
    assert space and not fixed
    assert s.objective in search.METRICS
    build_model(cfg)


def test_measurements_join_the_rows_and_leave_training_as_it_was(tmp_path):
    """val/loss after each epoch in the rows and metrics.csv, equal to the VAE's mean negative ELBO on the test
    split; the same weights as a run that measures nothing."""
    small = ["model=vae", "model.encoder.width=8", "dataset=synthetic", "dataset.n=64", "trainer.batch_size=32",
             "trainer.epochs=2", "trainer.n_samples=4"]
    measured = make_trainer([*small, "evaluation.metrics=[val/loss]"], tmp_path / "a")
    measured.fit()
    plain = make_trainer(small, tmp_path / "b")
    plain.fit()
    assert [r["epoch"] for r in measured.history if "val/loss" in r] == [1, 2]
    assert all("val/loss" not in r for r in plain.history)
    for a, b in zip(measured.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)
    test = split_of(compose_train(small)).images
    with torch.inference_mode():
        expected = measured.model.eval().anomaly_score(test.float().div(255), "elbo").mean()
    assert measured.history[-1]["val/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert [float(r["val/loss"]) for r in rows(tmp_path / "a" / "metrics.csv")] == pytest.approx(
        [r["val/loss"] for r in measured.history])


def test_fid_and_auroc_in_the_loop(tmp_path, monkeypatch):
    """eval/fid and eval/kid: the samples against the test split in a classifier's features (here an untrained
    one: genlab's own takes a minute to train); eval/auroc on one class."""
    from genlab import build, classifier, metrics
    from genlab.nets.classifier import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(channels=1, image_size=28, n_classes=10, width=4).eval()
    monkeypatch.setattr(build, "classifier_for", lambda dataset, device: (net, {}))  # where the run finds it
    gan = make_trainer(["model=dcgan", "trainer.max_steps=2", "trainer.batch_size=16", "trainer.n_samples=4",
                        "evaluation.metrics=[eval/fid]", "evaluation.n_samples=64"], tmp_path / "g")
    gan.fit()
    real = classifier.predict(net, split_of(compose_train(["model=dcgan"])).images, "cpu")[0]
    fake = classifier.predict(net, gan.model.eval().sample(64, generator=torch.Generator().manual_seed(0)), "cpu")[0]
    assert gan.history[-1]["eval/fid"] == pytest.approx(metrics.fid(real, fake), rel=1e-4)
    assert gan.history[-1]["eval/kid"] == pytest.approx(metrics.kid(real, fake)[0], rel=1e-4)
    vae = make_trainer([*TRIAL[:3], "dataset.classes=[0]", "trainer.max_steps=2", "trainer.batch_size=16",
                        "evaluation.metrics=[eval/auroc]"], tmp_path / "v")
    vae.fit()
    assert 0 <= vae.history[-1]["eval/auroc"] <= 1


@pytest.mark.parametrize("overrides,message", [
    (["evaluation.metrics=[val/nope]"], "val/nope is not a metric genlab measures"),
    (["evaluation.metrics=[val/loss]"], "GAN has none"),
    (["model=vae", "evaluation.metrics=[eval/auroc]"], "trained on every class"),
    (["model=vae", "evaluation.metrics=[val/loss]", "evaluation.every=0"], "evaluation.every must be"),
    (["trial.number=3"], "trial.storage is not"),
])
def test_measurements_that_cannot_be_made_are_refused(tmp_path, overrides, message):
    with pytest.raises(GenlabError, match=message):
        make_trainer(["dataset=synthetic", "dataset.n=64", *overrides], tmp_path)


def test_a_search_completes_continues_on_its_storage_and_reports_the_best(tmp_path):
    r = genlab("train", *SEARCH, "hydra.sweeper.n_trials=3", *TRIAL, "trainer.epochs=1", "hydra.sweep.dir=search",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = tmp_path / "search"
    first = {n: (runs / n / "checkpoints" / "last.pt").stat().st_mtime_ns for n in "012"}
    r = genlab("train", *SEARCH, "hydra.sweeper.n_trials=2", *TRIAL, "trainer.epochs=1", "hydra.sweep.dir=search",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "3 trials so far, 2 more" in out
    trials = rows(runs / "trials.csv")
    assert [t["number"] for t in trials] == ["0", "1", "2", "3", "4"] and {t["state"] for t in trials} == {"COMPLETE"}
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "4"]
    assert {n: (runs / n / "checkpoints" / "last.pt").stat().st_mtime_ns for n in "012"} == first  # untouched
    for t in trials:  # each trial is a genlab run in the directory of its number, its final val/loss the value told
        run = runs / t["number"]
        assert f"trial.number={t['number']}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert float(rows(run / "metrics.csv")[-1]["val/loss"]) == pytest.approx(float(t["val/loss"]))
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert float(t["optimizer.lr"]) == config["optimizer"]["lr"]
    best = min(trials, key=lambda t: float(t["val/loss"]))
    results = yaml.safe_load((runs / "optimization_results.yaml").read_text())
    assert results["best_trial"] == int(best["number"]) and results["trials"] == {"complete": 5}
    assert results["best_params"] == {"optimizer.lr": float(best["optimizer.lr"])}
    assert f"best: trial {best['number']}, val/loss" in out and (runs / "trials.png").is_file()
    study = optuna.load_study(study_name="genlab", storage=search.open_storage(str(runs / "study.journal")))
    assert len(study.trials) == 5 and all(t.intermediate_values.keys() == {1} for t in study.trials)


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_a_search_made_to_prune_prunes_and_a_failing_trial_fails_alone(tmp_path):
    """Every value is above the threshold pruner's upper bound: each trial stops after its first epoch, its
    checkpoint written. Launched again with runs that cannot start (on_nan=bogus): each of those trials fails
    alone, the next one still runs, and the search ends with no best parameters, listing the failed jobs."""
    prune = ["hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.upper=0"]
    r = genlab("train", *SEARCH, "hydra.sweeper.n_trials=2", *prune, *TRIAL, "trainer.epochs=3",
               "hydra.sweep.dir=search", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    trials = rows(tmp_path / "search" / "trials.csv")
    assert [(t["state"], t["last_epoch_reported"]) for t in trials] == [("PRUNED", "1")] * 2
    for t in trials:
        run = tmp_path / "search" / t["number"]
        assert [row["epoch"] for row in rows(run / "metrics.csv")] == ["1"]
        assert checkpoint.load(run)["step"] == 4  # one epoch of 4 steps, of 12
    r = genlab("train", *SEARCH, "hydra.sweeper.n_trials=2", *prune, *TRIAL, "trainer.on_nan=bogus",
               "hydra.sweep.dir=search", cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # as any sweep with a failed job: listed at the end, exit status 1
    assert r.stderr.count(" failed (") == 2
    assert r.stderr.count("error: trainer.on_nan=bogus is not one of") == 2 and "no best parameters" in r.stdout + r.stderr
    assert [t["state"] for t in rows(tmp_path / "search" / "trials.csv")] == ["PRUNED", "PRUNED", "FAIL", "FAIL"]
    assert yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())["trials"] == {
        "pruned": 2, "fail": 2}


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_two_joblib_workers_share_one_study(tmp_path):
    r = genlab("train", *SEARCH, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
               "hydra.sweeper.n_trials=2", *TRIAL, "trainer.epochs=2", "hydra.sweep.dir=search", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = tmp_path / "search"
    study = optuna.load_study(study_name="genlab", storage=search.open_storage(str(runs / "study.journal")))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.intermediate_values.keys() == {1, 2} for t in study.trials)  # reported by each worker as it trained
    # the two runs overlapped in time: each started before the other ended
    start = {n: (runs / n / ".hydra" / "config.yaml").stat().st_mtime for n in "01"}
    end = {n: (runs / n / "checkpoints" / "last.pt").stat().st_mtime for n in "01"}
    assert start["0"] < end["1"] and start["1"] < end["0"]


def exits(code):
    sys.exit(code)


def test_a_trial_whose_run_exits_fails_alone():
    """genlab's task exits on an error; in a search that trial fails (Hydra records the exception) and the search
    goes on, unless the run was stopped by a signal in the sweeper's own process (the basic launcher's). In a
    worker process (joblib's), a signal reached that process alone: its trial fails and the search goes on."""
    from hydra_plugins.genlab_optuna_sweeper.optuna_sweeper import TrialFailed, TrialTask  # as Hydra's scan left it

    with pytest.raises(TrialFailed, match="exit status 1"):
        TrialTask(exits)(1)
    with pytest.raises(SystemExit):
        TrialTask(exits)(130)
    assert TrialTask(lambda cfg: {"val/loss": cfg})(2.0) == {"val/loss": 2.0}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        error = pool.submit(TrialTask(exits), 143).exception()
    assert isinstance(error, TrialFailed), error  # was the SystemExit, which ended the search
    assert str(error) == "its run ended with exit status 143 (a signal stopped its worker process)"


def test_a_train_loss_is_reported_once_an_epoch_its_last_value(tmp_path):
    """A train/ loss is in every metrics row, and Optuna ignores a step reported again: each epoch reports one
    value, its last row's, at the step of the epoch (it was the first row's)."""
    journal = str(tmp_path / "study.journal")
    optuna.create_study(study_name="s", storage=search.open_storage(journal)).ask()
    trainer = make_trainer([*TRIAL, "trainer.epochs=2", "trainer.log_every=1", f"trial.storage={journal}",
                            "trial.study=s", "trial.number=0", "trial.objective=train/loss"], tmp_path / "run")
    trainer.fit()
    by_epoch = {}
    for r in rows(tmp_path / "run" / "metrics.csv"):
        by_epoch.setdefault(int(r["epoch"]), []).append(float(r["train/loss"]))
    assert [len(v) for v in by_epoch.values()] == [4, 4] and by_epoch[1][0] != by_epoch[1][-1]
    study = optuna.load_study(study_name="s", storage=search.open_storage(journal))
    assert study.trials[0].intermediate_values == pytest.approx({e: v[-1] for e, v in by_epoch.items()})
    assert study.trials[0].intermediate_values == {r["epoch"]: r["train/loss"] for r in trainer.history}  # exactly


# a callback of the runs (given as a logger) that kills trial `kill`'s worker the OOM killer's way (SIGKILL) once
# trial `after` has finished (has written trial.json; 2 minutes at most), and sends trial `term`'s a SIGTERM
KILLER = """
import os, signal, time
from pathlib import Path
from genlab.callbacks import Callback

class Kill(Callback):
    def __init__(self, kill, after, term, config, run_dir):
        self.kill, self.term, self.number = kill, term, config["trial"]["number"]
        self.after = Path(run_dir).parent / str(after) / "trial.json"

    def on_fit_start(self, trainer):
        if self.number == self.term:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.number == self.kill:
            for _ in range(1200):
                if self.after.is_file():
                    break
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_a_killed_worker_fails_its_trial_alone_and_the_search_goes_on(tmp_path):
    """Two joblib workers, two batches of two trials. In the first, trial 1's worker is SIGKILLed after trial 0
    has finished: joblib loses the batch's returns (TerminatedWorkerError, which ended the search); trial 0 is
    told its own result, from its run directory, and trial 1 fails. In the second, trial 2's worker gets a
    SIGTERM: its run saves and exits 143, which fails trial 2 alone (it ended the search), and trial 3 completes."""
    (tmp_path / "killer.py").write_text(KILLER)
    kill = ["+logger.kill._target_=killer.Kill", "+logger.kill.kill=1", "+logger.kill.after=0", "+logger.kill.term=2"]
    r = genlab("train", *SEARCH, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
               "hydra.sweeper.n_trials=4", *TRIAL, "trainer.epochs=1", *kill, "hydra.sweep.dir=search", cwd=tmp_path,
               env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    runs = tmp_path / "search"
    assert r.returncode == 1, r.stderr  # as any sweep with a failed job: listed at the end, exit status 1
    study = optuna.load_study(study_name="genlab", storage=search.open_storage(str(runs / "study.journal")))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    for t in study.trials[::3]:  # the value told is the run's own final val/loss
        assert t.value == pytest.approx(float(rows(runs / str(t.number) / "metrics.csv")[-1]["val/loss"]))
    errors = [t.user_attrs.get("error", "") for t in study.trials]
    assert errors == ["", "its run did not finish: a worker process of its batch died (TerminatedWorkerError: The "
                      "exit codes of the workers are {SIGKILL(-9)})",
                      "its run ended with exit status 143 (a signal stopped its worker process)", ""]
    assert [json.loads((runs / n / "status.json").read_text())["status"] for n in "0123"] == [
        "completed", "running", "interrupted", "completed"]
    assert [t["error"] for t in rows(runs / "trials.csv")] == errors
    results = yaml.safe_load((runs / "optimization_results.yaml").read_text())
    assert results["trials"] == {"complete": 2, "fail": 2} and results["best_trial"] in (0, 3)
    assert "job #1 running" in r.stderr and "job #2 interrupted" in r.stderr  # the sweep's list of its jobs
    assert f"best: trial {results['best_trial']}, val/loss" in r.stdout + r.stderr  # the search ended as any does


def test_without_optuna_the_sweeper_is_one_line(tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "optuna.py").write_text("raise ModuleNotFoundError(\"No module named 'optuna'\", name='optuna')\n")
    r = genlab("train", "hparams_search=vae_digits", cwd=tmp_path,
               env={"PYTHONPATH": os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 1
    assert r.stderr.strip() == ("genlab train: error: hydra/sweeper=optuna needs Optuna (>= 4), which is not "
                                "installed: pip install 'genlab[scale]'")
