"""genlab evaluate: reports on a checkpoint, one run or a whole sweep. task=anomaly (genlab.anomaly): one-class
anomaly detection, ROC/AUC; task=quality (genlab.quality): generation quality in the features of genlab's own
per-dataset classifier, plus the standard Inception FID when the user gives the Inception weights. A sweep's
reports are summarized over its runs and over each setting's seeds (genlab.summary). Each report is noted in the
run directory it is about (runs.record_evaluation), where `genlab report` finds it."""

import csv
import functools
import logging
from pathlib import Path

from omegaconf import DictConfig

from genlab import checkpoint, environment, plots, runs, summary
from genlab.summary import headline
from genlab.anomaly import anomaly_report
from genlab.build import trackers_of
from genlab.device import resolve_device, resolve_precision
from genlab.errors import GenlabError
from genlab.inception import load_inception
from genlab.quality import folder_report, quality_report

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, overrides=()) -> None:
    if cfg.task not in ("anomaly", "quality"):
        raise GenlabError(f"task={cfg.task} is not a genlab evaluate task: use task=anomaly or task=quality.")
    device = resolve_device(cfg.device)
    environment.record(run_dir, device, resolve_precision(cfg.precision, device, fp16=False))
    if cfg.task == "quality":
        inception = load_inception(cfg.inception_weights, device) if cfg.inception_weights else None
        report_of = functools.partial(quality_report, inception=inception)
    else:
        if cfg.inception_weights:
            log.warning("inception_weights= is for task=quality; task=anomaly does not use it")
        report_of, inception = anomaly_report, None
    if cfg.samples is not None:
        if cfg.task != "quality":
            raise GenlabError("samples=DIR is measured with task=quality.")
        if cfg.ckpt is not None:
            raise GenlabError("give ckpt=RUN (genlab draws the samples) or samples=DIR (a folder of images), not both.")
        log.info("%s", headline(folder_report(cfg.samples, run_dir, cfg, device, inception)))
        return
    if cfg.ckpt is None:
        raise GenlabError("genlab evaluate needs ckpt=RUN (a run, a checkpoint or a multirun directory), or "
                          "task=quality samples=DIR dataset=NAME for a folder of images.")
    if cfg.get("dataset") is not None:
        raise GenlabError("dataset= names the test split for samples=DIR; with ckpt= the run's own dataset is used "
                          "(dataset_root=PATH if it has moved).")
    found = runs.sweep_runs(Path(cfg.ckpt).expanduser())
    if found is None:
        report = report_of(cfg.ckpt, run_dir, cfg, device)
        log.info("%s", headline(report))
        runs.record_evaluation(runs.of_checkpoint(cfg.ckpt), cfg.task, run_dir)
        send_to_trackers(cfg.ckpt, report)
        return
    rows = []
    for sub in found:
        report = report_of(sub, run_dir / sub.name, cfg, device)
        log.info("%s (%s): %s", sub.name, " ".join(report["overrides"]), headline(report))
        runs.record_evaluation(sub, cfg.task, run_dir / sub.name)
        send_to_trackers(sub, report)
        rows.append(report)
    write_summary(rows, run_dir)
    runs.record_evaluation(Path(cfg.ckpt).expanduser(), cfg.task, run_dir)


def send_to_trackers(ckpt, report: dict) -> None:
    """The report's numbers (AUROC, FID, KID, ...) into the tracker runs of the run it is about, as
    ``evaluate/NAME`` at the checkpoint's step; a tracker that cannot be reached now is a warning, not an error."""
    state = checkpoint.load(ckpt)
    metrics = {f"evaluate/{k}": float(v) for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and not k.startswith("n_")}
    for tracker in trackers_of(state, checkpoint.resolve(ckpt).parent.parent):
        try:
            tracker.log_evaluation(metrics, int(state["step"]))
        except Exception as e:  # the report is written: a tracker out of reach now costs only its copy
            log.warning("could not send the report to logger.%s: %s", tracker.state_key, e)


def write_summary(rows: list[dict], out_dir: Path) -> None:
    """summary.csv and summary.md: one row per run, then the mean and sample standard deviation over all runs and,
    when some setting of the sweep was run with several seeds, over each setting's seeds. summary.png: the first
    metric of each run, one column per setting."""
    s = summary.sweep(rows)
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(summary.summary_csv_rows(s))
    (out_dir / "summary.md").write_text(summary.summary_markdown(s))
    key, head, _, _ = s.columns[0]
    plots.sweep({setting: [float(r[key]) for r in group] for setting, group in s.settings.items()}, head,
                out_dir / "summary.png", s.about)
    for setting, n, ms in s.stats:
        log.info("%s%s over %s: %s", f"{setting}: " if setting else "", head, summary.plural(n, "run"),
                 summary.text(ms[0], s.columns[0][2]))
