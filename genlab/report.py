"""genlab report PATH...: one standalone HTML page about a run, a sweep (a multirun directory), or several of them.

What a run wrote (its config and overrides, metrics.csv, the loss curves, the sample grids over time) and what
`genlab evaluate` wrote about it (found through the run's evaluations.json: ROC curve, AUROC, FID/KID/precision/
recall, classes) are gathered into plain dicts (``gather``), then rendered once by a Jinja2 template
(genlab/templates/report.html). Images are inlined, so the page needs neither network nor the run directory.
Several runs make a table with the overrides that vary as columns, sortable by clicking a heading, the best run
marked, and evaluate's summary tables (mean ± std over each setting's seeds, AUROC per class of a one-class sweep).
"""

import argparse
import base64
import io
import logging
import math
import sys
import time
from pathlib import Path

import yaml

from genlab import __version__, environment, runs, summary
from genlab.errors import GenlabError

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html"
GRIDS_OVER_TIME = 5  # the sample grids shown for a run: evenly spaced epochs, the last included
THUMB = 160  # pixels, the longer side of a thumbnail in the table of runs
PLUMBING = ("trial.",)  # overrides a search's sweeper sets on each trial: not what the user chose
SEARCH = "optimization_results.yaml"  # a search's results (genlab's Optuna sweeper)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="genlab report", description="One standalone HTML page (report.html) about a run directory, a multirun "
        "directory, or several: config, loss curves, sample grids over time, genlab evaluate's results; for several "
        "runs a sortable table of them with the swept overrides as columns.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a run directory or a multirun directory")
    parser.add_argument("-o", "--output", help="the page to write (default: PATH/report.html for one directory, "
                        "./report.html for several)")
    args = parser.parse_args(argv)
    try:
        out = write(args.paths, args.output)
    except (GenlabError, OSError) as e:
        print(f"genlab report: error: {e}", file=sys.stderr)
        return 1
    print(f"genlab report: wrote {out}")
    return 0


def write(paths: list, output=None) -> Path:
    paths = [Path(p).expanduser() for p in paths]
    out = Path(output).expanduser() if output else (paths[0] / "report.html" if len(paths) == 1 else Path("report.html"))
    if out.is_dir():
        out = out / "report.html"
    page = render(gather(paths))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# ---- gathering ----------------------------------------------------------------------------------------------


def gather(paths: list[Path]) -> dict:
    """Everything the page shows, as plain data."""
    found, sweeps = [], []
    for p in paths:
        if not p.exists():
            raise GenlabError(f"{p} does not exist: give a run directory or a multirun directory.")
        if not p.is_dir():
            raise GenlabError(f"{p} is a file: give a run directory or a multirun directory.")
        if runs.is_run(p):
            found.append((f"{p.parent.name}/{p.name}" if p.name.isdigit() else p.name, p))  # a sweep's job: 3
            continue
        subs = sorted((d for d in p.iterdir() if d.is_dir() and (runs.is_run(d) or (d / "status.json").is_file())),
                      key=lambda d: (len(d.name), d.name))
        if not subs:
            raise GenlabError(f"{p} holds no run (no metrics.csv or checkpoint in it or in its folders): give a run "
                              "directory or a multirun directory.")
        prefix = f"{p.name}/" if len(paths) > 1 else ""
        found += [(prefix + d.name, d) for d in subs]
        sweeps.append(p)
    items = [run_of(name, d) for name, d in found]
    page = {"title": title(paths, items), "paths": [str(p.resolve()) for p in paths], "runs": items,
            "made": time.strftime("%Y-%m-%d %H:%M"), "version": __version__, "search": None}
    if len(items) > 1:
        search = read_yaml(sweeps[0] / SEARCH) if len(sweeps) == 1 else None  # one search's own page
        page.update(compare(items, search if isinstance(search, dict) and search.get("objective") else None))
        page["sweep_plots"] = [image(s / "trials.png", "the objective of each trial") for s in sweeps
                               if (s / "trials.png").is_file()]
        page["sweep_plots"] += [image(e[0] / "summary.png") for s in sweeps for e in runs.evaluations(s).values()
                                if (e[0] / "summary.png").is_file()]
    return page


def run_of(name: str, d: Path) -> dict:
    rows = runs.metrics(d)
    status = read_yaml(d / "status.json") or {}
    config = (d / ".hydra" / "config.yaml")
    cfg = read_yaml(config) or {}
    grids = sorted((d / "samples").glob("epoch_*.png"))
    shown = [grids[round(i * (len(grids) - 1) / (GRIDS_OVER_TIME - 1))] for i in range(GRIDS_OVER_TIME)] \
        if len(grids) > GRIDS_OVER_TIME else grids
    shown = list(dict.fromkeys(shown))
    evaluations = []
    for task, (where, report) in sorted(runs.evaluations(d).items()):
        if report.get("summary"):
            continue
        pictures = [image(where / f, caption) for f, caption in
                    (("roc.png", "ROC curve"), ("samples.png", "samples measured"), ("classes.png", "classes"),
                     ("overlays_good_highest.png", "good images scored highest"),
                     ("overlays_defect_highest.png", "defects scored highest"),
                     ("overlays_defect_lowest.png", "defects scored lowest"))
                    if (where / f).is_file()]
        evaluations.append({"task": task, "dir": str(where), "report": report, "title": summary.report_title(report),
                            "tables": [table(t) for t in summary.report_tables(report)],
                            "notes": summary.report_notes(report), "images": pictures})
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    dataset = cfg.get("dataset", {}) if isinstance(cfg.get("dataset"), dict) else {}
    return {
        "name": name, "path": str(d.resolve()), "overrides": [o for o in runs.overrides(d) if not o.startswith(PLUMBING)],
        "model": str(model.get("_target_", "?")).rsplit(".", 1)[-1], "dataset": str(dataset.get("_target_", "?")).rsplit(".", 1)[-1],
        "classes": " ".join(map(str, dataset.get("classes") or [])),
        "config": config.read_text() if config.is_file() else "", "final": rows[-1] if rows else {},
        "steps": len(rows), "status": status.get("status", "completed" if (d / "checkpoints" / "last.pt").is_file()
                                               else "no checkpoint"),
        "error": status.get("error", ""),
        "loss_curves": image(d / "loss_curves.png", "loss curves") if (d / "loss_curves.png").is_file() else None,
        "gif": image(d / "samples" / "progress.gif", "the fixed-noise grid of every epoch")
        if (d / "samples" / "progress.gif").is_file() else None,
        "grids": [image(g, f"epoch {int(g.stem.split('_')[1])}") for g in shown],
        "thumb": image(grids[-1], f"{name}: last grid", THUMB) if grids else None,
        "evaluations": evaluations,
        "environment": environment.summary(env) if (env := environment.read(d)) else "",
        "tags": [str(t) for t in cfg.get("tags") or []],
    }


def compare(items: list[dict], search: dict | None = None) -> dict:
    """The table of runs (overrides that vary as columns, evaluate's metrics, the last losses) and evaluate's
    summary tables over them. A search's (``search``: its optimization_results.yaml) leads with its objective
    and marks its best trial."""
    shown = [r["overrides"] for r in items]
    varying = varying_keys(shown)
    common = [o for o in shown[0] if all(o in s for s in shown)]
    tasks = [t for t in ("anomaly", "quality") if all(any(e["task"] == t for e in r["evaluations"]) for r in items)]
    reports = {t: [next(e["report"] for e in r["evaluations"] if e["task"] == t) for r in items] for t in tasks}
    metric_cols = [(t, key, head, spec) for t in tasks for key, head, spec, _ in summary.COLUMNS[t]
                   if all(key in rep for rep in reports[t])]
    objective = [search["objective"]] if search else []
    losses = [k for k in dict.fromkeys(k for r in items for k in r["final"] if k.startswith(("train/", "val/", "eval/")))
              if k not in objective]
    tagged = ["tags"] if any(r["tags"] for r in items) else []  # the run's tags=[...], where any run has some
    heads = ["run", *tagged, *objective, *varying, *(head for _, _, head, _ in metric_cols), *losses, "epoch", "wall time (s)",
             "status"]
    specs = ["", *[""] * len(tagged), *[".4g"] * len(objective), *[""] * len(varying), *(spec for *_, spec in metric_cols),
             *[".4g"] * len(losses), ".0f", ".1f", ""]
    rows = []
    for i, r in enumerate(items):
        values = dict(o.split("=", 1) for o in shown[i] if "=" in o)
        cells = [r["name"], *([" ".join(r["tags"])] if tagged else []), *(r["final"].get(k) for k in objective), *(number(values.get(k, "")) for k in varying),
                 *(reports[t][i][key] for t, key, _, _ in metric_cols),
                 *(r["final"].get(k) for k in losses), r["final"].get("epoch"), r["final"].get("wall_time"), r["status"]]
        rows.append([{"text": summary.text(v, s), "sort": summary.sort_key(v)} for v, s in zip(cells, specs)])
    best, best_by, tables = None, None, []
    if search:
        best = best_trial(items, search)
        best_by = f"{search['objective']} ({'lower' if search.get('direction') == 'minimize' else 'higher'} is better)"
    elif tasks:
        s = summary.sweep(reports[tasks[0]])
        best = s.best
        best_by = f"{metric_cols[0][2]} ({'higher' if summary.COLUMNS[tasks[0]][0][3] else 'lower'} is better)"
    if tasks:
        s = summary.sweep(reports[tasks[0]])
        tables = [table(t) for t in summary.sweep_tables(s)[1:]]  # the runs are in the table above
        tables.insert(0, table(summary.Table("Over all runs:", ["runs", *(h for _, h, _, _ in s.columns)],
                                             [[len(items), *s.stats[0][2]]], ["", *(c[2] for c in s.columns)])))
    lead = None
    if search:  # the search in one line, above its table
        lead = {"objective": search["objective"], "direction": search.get("direction", ""), "trials": len(items),
                "best": items[best]["name"] if best is not None else None,
                "value": summary.text(items[best]["final"].get(search["objective"])) if best is not None else "",
                "overrides": " ".join(f"{k}={summary.text(number(v))}" for k, v in (o.split("=", 1) for o in shown[best]
                                      if "=" in o) if k in varying) if best is not None else ""}
    return {"columns": heads, "rows": rows, "best": best, "common": common, "varying": varying, "best_by": best_by,
            "summary_tables": tables, "search": lead}


def best_trial(items: list[dict], search: dict) -> int | None:
    """The row of a search's best trial: the run its optimization_results.yaml names, else the best objective of
    the completed runs."""
    where = search.get("best_run_dir")
    for i, r in enumerate(items):
        if where and Path(where).resolve() == Path(r["path"]):
            return i
    key, sign = search["objective"], 1 if search.get("direction") == "minimize" else -1
    done = [(sign * r["final"][key], i) for i, r in enumerate(items)
            if r["status"] == "completed" and isinstance(r["final"].get(key), float) and math.isfinite(r["final"][key])]
    return min(done)[1] if done else None


def number(value: str):
    """An override's value as a number where it is one (a learning rate prints with 4 significant digits)."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def varying_keys(overrides: list[list[str]]) -> list[str]:
    """The override keys whose values differ between runs (or that some runs lack), in first-seen order."""
    parsed = [dict(o.split("=", 1) for o in os if "=" in o) for os in overrides]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    return [k for k in keys if len({p.get(k) for p in parsed}) > 1]


def table(t: summary.Table) -> dict:
    return {"title": t.title, "heads": t.heads, "best": t.best,
            "rows": [[{"text": c, "sort": summary.sort_key(v)} for c, v in zip(t.cells(row), row)] for row in t.rows]}


def title(paths: list[Path], items: list[dict]) -> str:
    about = " / ".join(dict.fromkeys(f"{r['model']} on {r['dataset']}" for r in items))
    if len(items) == 1:
        classes = items[0]["classes"]
        return f"{about}{f' (classes {classes})' if classes else ''}: {items[0]['name']}"
    return f"{about}: {summary.plural(len(items), 'run')} ({', '.join(p.name for p in paths)})"


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def image(path: Path, caption: str = "", max_side: int | None = None) -> dict:
    """An image file as a data: URI (PNG thumbnails at ``max_side`` pixels), so that the page stands alone."""
    data = Path(path).read_bytes()
    kind = "gif" if path.suffix.lower() == ".gif" else "png"
    if max_side is not None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            data, kind = buf.getvalue(), "png"
    return {"src": f"data:image/{kind};base64,{base64.b64encode(data).decode()}", "caption": caption,
            "name": path.name}


def render(page: dict) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["cell"] = summary.text
    return env.get_template(TEMPLATE.name).render(**page)
