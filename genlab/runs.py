"""A run directory as it lies on disk, read back: what `genlab evaluate` and `genlab report` need from it.

A run directory holds ``.hydra/`` (config.yaml, overrides.yaml), ``metrics.csv``, ``loss_curves.png``,
``samples/`` (epoch_NNNN.png, progress.gif), ``checkpoints/`` and, in a sweep, ``status.json``; `genlab evaluate`
adds ``evaluations.json``, where each of its reports on the run went. A multirun directory holds runs."""

import csv
import json
import logging
import os
import time
from pathlib import Path

import yaml

from genlab import bundle, checkpoint
from genlab.errors import GenlabError

log = logging.getLogger(__name__)

EVALUATIONS = "evaluations.json"


def mark_latest(run_dir: Path, verb: str, outputs: Path = Path("outputs")) -> Path | None:
    """``outputs/<verb>/latest``: a link to ``run_dir``, the newest run (or sweep job) of ``verb``, when it lies in
    genlab's layout under ``outputs/<verb>/`` (a run put elsewhere with hydra.run.dir leaves it alone). The link is
    relative, and replaced whole (a temporary link renamed over it), so that jobs that start together leave one
    working link, the last one's. Returns the link, or None."""
    base = (Path.cwd() / outputs / verb).resolve()
    target = Path(run_dir).resolve()
    if not target.is_relative_to(base) or target == base:
        return None
    link, tmp = base / "latest", base / f".latest.tmp{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, base), tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:  # a file system without links: the run itself is whole
        log.debug("could not link %s: %s", link, e)
        return None
    return link


def is_run(path: Path) -> bool:
    return (path / "checkpoints" / "last.pt").is_file() or (path / "metrics.csv").is_file()


def sweep_runs(path: Path) -> list[Path] | None:
    """The runs (with a checkpoint) of a multirun directory, in job order, or None when ``path`` is one run or a file."""
    if not path.is_dir() or (path / "checkpoints" / "last.pt").is_file() or bundle.is_export(path):
        return None
    found = [p for p in path.iterdir() if (p / "checkpoints" / "last.pt").is_file()]
    if not found:
        raise GenlabError(f"no checkpoint in {path}: give a run directory, a .pt file or a multirun directory.")
    return sorted(found, key=lambda p: (len(p.name), p.name))


def of_checkpoint(ckpt) -> Path:
    """The run directory a checkpoint (or a run directory) belongs to; an export folder is its own."""
    path = checkpoint.resolve(ckpt)
    return path.parent if bundle.is_export(path.parent) else path.parent.parent


def overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was started with (its .hydra/overrides.yaml), Hydra's own left out."""
    if bundle.is_export(run_dir):  # its run's, kept in its manifest (not those of the export command)
        return list(_read_json(run_dir / bundle.MANIFEST, {}).get("overrides", []))
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith("hydra.")]


def metrics(run_dir: Path) -> list[dict]:
    """metrics.csv's rows, numbers as floats (a column a row lacks is left out of it)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(fh)]


def record_evaluation(run_dir: Path, task: str, report_dir: Path) -> None:
    """Note in ``run_dir`` (a run, or the multirun directory of a sweep) where a report on it was written, so that
    `genlab report RUN` finds it. A run directory that cannot be written to costs a warning, not the report."""
    if bundle.is_export(run_dir):  # an export stays as it was written
        return
    path = run_dir / EVALUATIONS
    entry = {"task": task, "dir": str(Path(report_dir).resolve()), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        with checkpoint.file_lock(path.with_name(f".{EVALUATIONS}.lock")):  # evaluations at once each add theirs
            entries = [e for e in _read_json(path, []) if e.get("dir") != entry["dir"]]
            tmp = path.with_name(f".{EVALUATIONS}.{os.getpid()}")
            tmp.write_text(json.dumps([*entries, entry], indent=1) + "\n")
            os.replace(tmp, path)
    except OSError as e:
        log.warning("could not note in %s where the report went (%s): genlab report will not find it", run_dir, e)


def evaluations(run_dir: Path) -> dict[str, tuple[Path, dict]]:
    """The newest report of each task `genlab evaluate` wrote on this run: task -> (its directory, report.json)."""
    found = {}
    for e in _read_json(run_dir / EVALUATIONS, []):
        where = Path(e.get("dir", ""))
        report = _read_json(where / "report.json", None)
        if report is None:  # a sweep's summary, or a report since deleted
            report = {"task": e.get("task"), "summary": True} if (where / "summary.csv").is_file() else None
        if report is not None:
            found[e.get("task")] = (where, report)  # later entries are newer
    return found


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default
