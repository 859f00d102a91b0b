"""``hydra/sweeper=optuna``: a hyperparameter search with Optuna (>= 4), shipped with genlab.

The search space is written as hydra-optuna-sweeper's ``params`` (and lightning-hydra-template's): each key
an override, each value ``choice(...)``, ``a,b,c``, ``range(start, stop[, step])`` (stop excluded, as in
Hydra), ``interval(low, high)`` or ``tag(log, interval(low, high))``; a sweep of this kind on the command line
adds a dimension, a plain ``key=value`` there fixes one. The sweeper owns the loop over trials through
Optuna's ask-and-tell API: it asks for ``n_jobs`` trials, launches them as one batch through the configured
Hydra launcher (basic: one after the other; joblib, submitit: at once), and tells the study each result. A
trial is an ordinary genlab run in ``<sweep dir>/<trial number>``, given ``trial.storage``, ``trial.study``,
``trial.number`` and ``trial.objective``: it measures the objective as it trains and reports it to the study,
whose pruner may stop it (genlab.search). The study lives in ``storage`` (a journal file in the sweep
directory by default), so that a search launched again on it continues, and several searches on one storage
(machines, launchers) share it. After each batch the sweep directory gets optimization_results.yaml (the
best parameters), trials.csv and trials.png. A worker process that dies (the OOM killer, a SIGKILL) fails its
trial alone: the trials of its batch that finished are told what they wrote into their run directories
(trial.json), the others fail, and the search goes on.
"""

import csv
import json
import logging
import math
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

from genlab import search

log = logging.getLogger(__name__)

JOURNAL = "study.journal"  # the default storage, in the sweep directory
RESULTS = "optimization_results.yaml"  # hydra-optuna-sweeper's name for it
RESULT = "trial.json"  # in a trial's run directory: what its run returned, for when a dead worker took it with it


# hydra/sweeper/sampler=NAME and hydra/sweeper/pruner=NAME: Optuna's by _target_, with their main settings
SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "n_startup_trials": 10},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": None, "n_startup_trials": 1},
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "seed": None, "qmc_type": "sobol"},
}
PRUNERS = {
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0},
    "percentile": {"_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0, "n_startup_trials": 5,
                   "n_warmup_steps": 0},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "max_resource": "auto",
                  "reduction_factor": 3},
    "successive_halving": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": "auto",
                           "reduction_factor": 4},
    "threshold": {"_target_": "optuna.pruners.ThresholdPruner", "lower": None, "upper": None},
    "nop": {"_target_": "optuna.pruners.NopPruner"},
}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.genlab_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built once Optuna is known to be there
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    objective: Optional[str] = None  # the metric: val/loss, eval/fid, eval/kid, eval/auroc or a train/ loss
    direction: Optional[str] = None  # minimize | maximize; null: the objective's own (eval/auroc: maximize)
    n_trials: int = 20  # trials this launch runs; a study launched again on its storage adds them to those it has
    n_jobs: int = 1  # trials launched at once (in parallel with hydra/launcher=joblib or submitit)
    study_name: str = "genlab"
    storage: Optional[str] = None  # null: <sweep dir>/study.journal; a journal file's path; a database URL
    sampler: Optional[Dict[str, Any]] = None  # hydra/sweeper/sampler=tpe (the default), random, cmaes, qmc
    pruner: Optional[Dict[str, Any]] = None  # hydra/sweeper/pruner=median (the default), percentile, hyperband, ...
    params: Dict[str, str] = field(default_factory=dict)  # the search space: override -> choice/range/interval


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="genlab")
for _group, _options in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
    for _name, _node in _options.items():
        ConfigStore.instance().store(group=f"hydra/sweeper/{_group}", name=_name, node=_node, provider="genlab")


class SearchError(CompactHydraException):
    """A search that cannot start (with HYDRA_FULL_ERROR=1; else its message is printed alone)."""


class TrialFailed(Exception):
    """A trial whose run ended with an error."""


class TrialTask:
    """The task of a trial. genlab's task prints an error and exits, which would end the whole search with the
    basic launcher (it runs trials in this process): here that trial fails and the search goes on. A signal
    (exit status 128 and above) ends the search where the trial runs in the sweeper's own process (the basic
    launcher: Ctrl-C); in a worker process (joblib, submitit), which a signal reached alone, it fails that trial
    alone. What the run returns is also written into its run directory (RESULT)."""

    def __init__(self, task):
        self.task, self.home = task, os.getpid()  # the sweeper's process

    def __call__(self, cfg):
        try:
            ret = self.task(cfg)
        except SystemExit as e:
            signal = not isinstance(e.code, int) or e.code >= 128
            if signal and os.getpid() == self.home:
                raise
            why = "a signal stopped its worker process" if signal else "the error is printed above"
            raise TrialFailed(f"its run ended with exit status {e.code} ({why})") from None
        if isinstance(ret, dict) and HydraConfig.initialized():
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            (run_dir / RESULT).write_text(json.dumps(ret, default=str) + "\n")
        return ret


class OptunaSweeper(Sweeper):
    def __init__(self, objective: Optional[str], direction: Optional[str], n_trials: int, n_jobs: int,
                 study_name: str, storage: Optional[str], sampler, pruner, params):
        self.objective, self.direction, self.n_trials, self.n_jobs = objective, direction, n_trials, n_jobs
        self.study_name, self.storage, self.sampler, self.pruner = study_name, storage, sampler, pruner
        self.params = dict(params or {})
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        try:
            import optuna
        except ImportError:
            self.stop("hydra/sweeper=optuna needs Optuna (>= 4), which is not installed: pip install 'genlab[scale]'")
        if int(optuna.__version__.split(".")[0]) < 4:
            self.stop(f"hydra/sweeper=optuna needs Optuna >= 4, and this is {optuna.__version__}: "
                      "pip install -U 'genlab[scale]'")
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=TrialTask(task_function), config=config)

    def stop(self, message: str) -> None:
        """End the search before it launches anything, with one line as genlab's errors do (a traceback too with
        HYDRA_FULL_ERROR=1)."""
        line = f"genlab {self.config.hydra.job.name}: error: {message}"
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise SearchError(line)
        print(line, file=sys.stderr)
        sys.exit(1)

    def sweep(self, arguments: List[str]) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        objective, direction = self.objective, self.direction
        if not objective or not (objective in search.METRICS or objective.startswith("train/")):
            self.stop(f"hydra.sweeper.objective={objective or 'null'}: name the metric to optimize: one of "
                      f"{', '.join(search.METRICS)}, or a training loss train/NAME of the model.")
        direction = direction or search.direction(objective)
        if direction not in ("minimize", "maximize"):
            self.stop(f"hydra.sweeper.direction={direction} is not minimize or maximize.")
        if self.n_trials < 1 or self.n_jobs < 1:
            self.stop("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be at least 1.")
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed = self.search_space(parser.parse_overrides(
            [f"{k}={v}" for k, v in self.params.items()] + list(arguments)))
        if not space:
            self.stop("nothing to search: give hydra.sweeper.params (a preset: hparams_search=NAME) or a "
                      "sweep on the command line, e.g. 'optimizer.lr=tag(log, interval(1e-5, 1e-2))'.")
        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = self.storage or str(sweep_dir / JOURNAL)
        study = self.open_study(storage, objective, direction)
        for start in range(0, self.n_trials, self.n_jobs):
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - start))]
            self.launch(study, trials, fixed, storage, objective, sweep_dir)
            best = write_results(study, sweep_dir, objective, storage)
        if best is None:
            log.warning("no trial of study %s has completed yet: no best parameters", self.study_name)
        else:
            log.info("best: trial %d, %s %.6g, with %s (%s)", best["best_trial"], objective, best["best_value"],
                     best["best_overrides"], sweep_dir / RESULTS)

    def open_study(self, storage: str, objective: str, direction: str):
        """The study in ``storage`` (made, or continued when it has the same objective and direction)."""
        import optuna

        sampler, pruner = self.build(self.sampler, "sampler"), self.build(self.pruner, "pruner")
        study = optuna.create_study(study_name=self.study_name, storage=search.open_storage(storage), sampler=sampler,
                                    pruner=pruner, direction=direction, load_if_exists=True)
        theirs = (study.user_attrs.get("objective", objective), study.direction.name.lower())
        if theirs != (objective, direction):
            self.stop(f"the study {self.study_name} in {storage} has {theirs[1]}d {theirs[0]}; this search "
                      f"would {direction} {objective}. Choose another hydra.sweeper.study_name or storage.")
        study.set_user_attr("objective", objective)
        study.set_user_attr("pruner", OmegaConf.to_container(self.pruner) if self.pruner else None)  # for the runs
        log.info("Optuna study %s in %s (%s %s): %d trials so far, %d more, %d at a time", self.study_name, storage,
                 direction, objective, len(study.trials), self.n_trials, self.n_jobs)
        return study

    def launch(self, study, trials, fixed: list[str], storage: str, objective: str, sweep_dir: Path) -> None:
        """One batch of trials through the launcher, each an ordinary run in ``sweep_dir/<trial number>`` told
        which study it reports to; then each result told to the study."""
        import optuna

        batch = []
        for t in trials:
            t.set_user_attr("run_dir", str(sweep_dir / str(t.number)))
            (sweep_dir / str(t.number) / RESULT).unlink(missing_ok=True)  # of a study started again in this directory
            batch.append([*fixed, *(f"{k}={text(v)}" for k, v in t.params.items()),
                          f"trial.storage={quoted(storage)}", f"trial.study={quoted(self.study_name)}",
                          f"trial.number={t.number}", f"trial.objective={quoted(objective)}",
                          f"hydra.sweep.subdir={t.number}"])  # a continued study adds directories
        try:
            self.validate_batch_is_legal(batch)
            results = [outcome(ret) for ret in self.launcher.launch(batch, initial_job_idx=trials[0].number)]
        except BrokenProcessPool as e:  # a worker process died (joblib's TerminatedWorkerError), the batch with it
            log.warning("trials %s: %s; each is told what its run directory holds", [t.number for t in trials], died(e))
            results = [left(sweep_dir / str(t.number), died(e)) for t in trials]
        except BaseException:
            for t in trials:
                study.tell(t, state=optuna.trial.TrialState.FAIL)
            raise
        for t, result in zip(trials, results):
            tell(study, t, result, objective)

    def build(self, node, what: str):
        """The sampler or pruner a ``_target_`` node names (None: Optuna's default sampler, no pruning)."""
        from hydra.utils import instantiate

        if node is None:
            return None
        try:
            return instantiate(node)
        except Exception as e:
            self.stop(f"hydra.sweeper.{what}: {' '.join(str(e).split())}")

    def search_space(self, overrides) -> tuple[dict, list[str]]:
        """Parsed overrides as Optuna distributions by name (the sweeps) and the overrides every trial gets (the
        rest); a later override of a key replaces an earlier one."""
        from hydra.core.override_parser.types import Transformer
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        space, fixed = {}, {}
        for o in overrides:
            key = o.get_key_element()
            space.pop(key, None)
            fixed.pop(key, None)
            if not o.is_sweep_override():
                fixed[key] = o.input_line
                continue
            value = o.value()
            try:
                if o.is_interval_sweep():
                    ints = isinstance(value.start, int) and isinstance(value.end, int)
                    space[key] = (IntDistribution if ints else FloatDistribution)(value.start, value.end,
                                                                                  log="log" in value.tags)
                elif o.is_range_sweep() and not value.shuffle:
                    values = list(o.sweep_iterator())
                    if not values:
                        raise ValueError("the range is empty")
                    ints = all(isinstance(v, int) for v in values)
                    space[key] = (IntDistribution if ints else FloatDistribution)(min(values), max(values),
                                                                                  step=abs(value.step))
                else:  # choice(...), a,b,c, shuffle(...), glob(...)
                    space[key] = CategoricalDistribution(list(o.sweep_iterator(transformer=Transformer.encode)))
            except ValueError as e:  # also a log interval from 0, ...
                self.stop(f"{o.input_line}: {e}")
        return space, list(fixed.values())


def outcome(ret) -> dict | Exception:
    """What a trial's run (Hydra's JobReturn) returned, or the exception it raised."""
    try:
        return ret.return_value or {}
    except Exception as e:
        return e


def died(error: BaseException) -> str:
    """A worker's death in one line: loky's exit codes (``{SIGKILL(-9)}``) rather than its paragraph."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("The exit codes")] or lines or ["no message"]
    return f"a worker process of its batch died ({type(error).__name__}: {said[0]})"


def left(run_dir: Path, death: str) -> dict | Exception:
    """What a trial's run returned, read from its run directory after a worker's ``death`` lost the batch's
    returns; a TrialFailed saying so where the run wrote nothing (it did not finish)."""
    try:
        return json.loads((run_dir / RESULT).read_text())
    except (OSError, ValueError):
        return TrialFailed(f"its run did not finish: {death}")


def tell(study, trial, result: dict | Exception, objective: str) -> None:
    """Tell the study how a trial's run went (what it returned, or the exception it raised): its final objective,
    pruned, or failed."""
    from optuna.trial import TrialState

    if isinstance(result, Exception):  # the run raised
        fail(study, trial, str(result))
        return
    value = result.get(objective)
    if result.get("stopped"):  # in a search, only the pruner stops a run early
        log.info("trial %d pruned after epoch %s: %s %s", trial.number, result.get("epoch"), objective, value)
        study.tell(trial, state=TrialState.PRUNED)
    elif isinstance(value, (int, float)) and math.isfinite(value):
        log.info("trial %d: %s %.6g", trial.number, objective, value)
        study.tell(trial, value)
    else:
        metrics = ", ".join(k for k in result if "/" in k)
        fail(study, trial, f"its run gave {objective} {value} (its metrics: {metrics})")


def fail(study, trial, error: str) -> None:
    """A failed trial: its reason logged in one line and kept as its user attribute ``error`` (trials.csv's)."""
    from optuna.trial import TrialState

    log.warning("trial %d failed: %s", trial.number, error)
    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)


def write_results(study, sweep_dir: Path, objective: str, storage: str) -> dict | None:
    """optimization_results.yaml (the best trial), trials.csv (every trial of the study) and trials.png; returns
    the best trial's part of the results, or None when no trial has completed."""
    from optuna.trial import TrialState

    from genlab import plots

    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    with open(sweep_dir / "trials.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", objective, *names, "last_epoch_reported", "seconds", "run_dir", "error"])
        for t in trials:
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                        *(t.params.get(k, "") for k in names), "" if t.last_step is None else t.last_step,
                        "" if t.duration is None else round(t.duration.total_seconds(), 1),
                        t.user_attrs.get("run_dir", ""), t.user_attrs.get("error", "")])
    direction = study.direction.name.lower()
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    results = {"name": "optuna", "study": study.study_name, "storage": storage, "objective": objective,
               "direction": direction, "trials": {s: n for s, n in counts.items() if n}}
    best = None
    if any(t.state == TrialState.COMPLETE for t in trials):
        b = study.best_trial
        best = {"best_trial": b.number, "best_value": b.value, "best_params": dict(b.params),
                "best_overrides": " ".join(f"{k}={text(v)}" for k, v in b.params.items()),
                "best_run_dir": b.user_attrs.get("run_dir")}
        results.update(best)
    OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS)
    plots.trials([(t.number, t.state.name, t.value) for t in trials], objective, direction, sweep_dir / "trials.png",
                 f"Optuna study {study.study_name}: {len(trials)} trials")
    return best


def text(value) -> str:
    """A parameter's value as an override's value: choices keep Hydra's own text for them."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else repr(value) if isinstance(value, float) else str(value)


def quoted(s: str) -> str:
    return "'" + str(s).replace("'", "\\'") + "'"
