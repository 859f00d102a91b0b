"""What genlab adds to Hydra's sweeps (``-m``), under any launcher (basic, joblib, submitit):

- each job writes how it ended into its run directory, ``status.json``: ``running`` while it runs, then
  ``completed``, ``failed`` (with the error's one line) or ``interrupted``. A failing job does not stop the
  others: the task function (genlab.cli) records the error and returns, and the record is the job's return
  value (with the run's own result, its last metrics), so a sweeper reads it there too;
- ``Summary``, a Hydra callback (configs/hydra_defaults.yaml), lists every job when the sweep ends, writes
  ``jobs.csv`` into the sweep directory and exits non-zero when a job failed;
- ``share_cpus``: jobs that run side by side on one machine (hydra/launcher=joblib) divide its CPUs among
  torch's threads, so that they do not slow each other down.
"""

import csv
import json
import logging
import os
import sys
from pathlib import Path

import torch
from hydra.experimental.callback import Callback

from genlab import errors
from genlab.errors import GenlabError, Interrupted

log = logging.getLogger(__name__)

STATUS = "status.json"
FAILED = ("failed", "interrupted", "running")  # "running" at the end: the job's process died without a word


class Job:
    """One job of a sweep: its run directory's status.json, written when it starts and when it ends."""

    def __init__(self, run_dir, num: int, overrides):
        self.path, self.record = Path(run_dir) / STATUS, {"job": num, "status": "running", "overrides": list(overrides)}
        self._write()

    def end(self, error: BaseException | None = None) -> dict:
        if error is None:
            self.record["status"] = "completed"
        else:
            stopped = isinstance(error, (Interrupted, KeyboardInterrupt))
            self.record["status"] = "interrupted" if stopped else "failed"
            self.record["error"] = one_line(error)
        self._write()
        return self.record

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record) + "\n")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, (GenlabError, OSError)) else f"{type(error).__name__}: {text}"


def share_cpus(launcher) -> int | None:
    """Under hydra/launcher=joblib, ``n_jobs`` jobs run at once on this machine: torch's threads of each become
    its share of the CPUs (at least 1). Returns that number, or None under another launcher. (joblib itself sets
    OMP_NUM_THREADS so in its workers, but keeps a value the environment already has.)"""
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = launcher.get("n_jobs") or 1
    if n_jobs < 0:  # joblib's count from the end: -1 is one job per CPU, -2 all CPUs but one
        n_jobs = max(1, cpus + 1 + n_jobs)
    threads = max(1, cpus // n_jobs)
    torch.set_num_threads(threads)
    log.info("hydra/launcher=joblib: %d jobs at once on %d CPUs, %d torch thread(s) each", n_jobs, cpus, threads)
    return threads


class Summary(Callback):
    """At the end of a sweep: a line per job that did not complete, a count, ``jobs.csv`` in the sweep directory,
    and exit status 1 when a job failed."""

    def on_multirun_start(self, config, **kwargs) -> None:
        errors.composed()  # the jobs may run in other processes (joblib, submitit): genlab speaks for itself now

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sorted((json.loads(p.read_text()) | {"run_dir": str(p.parent)} for p in sweep_dir.rglob(STATUS)),
                      key=lambda j: j["job"])
        if not jobs:
            return
        with open(sweep_dir / "jobs.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["job", "status", "overrides", "run_dir", "error"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**j, "overrides": " ".join(j["overrides"])} for j in jobs)
        who = f"genlab {config.hydra.job.name}"
        counts = {s: sum(j["status"] == s for j in jobs) for s in dict.fromkeys(j["status"] for j in jobs)}
        told = ", ".join(f"{n} {'did not finish' if s == 'running' else s}" for s, n in counts.items())
        print(f"{who}: sweep of {len(jobs)} job{'s' * (len(jobs) > 1)}: {told}; {sweep_dir / 'jobs.csv'} lists them")
        failed = [j for j in jobs if j["status"] in FAILED]
        for j in failed:
            print(f"{who}: job #{j['job']} {j['status']} ({' '.join(j['overrides']) or 'no overrides'}) in "
                  f"{j['run_dir']}: {j.get('error', 'its process ended without a word')}", file=sys.stderr)
        if failed:
            sys.exit(1)
