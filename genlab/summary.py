"""What `genlab evaluate` found, as plain tables: one model of a report and of a sweep's reports, which
evaluate writes as markdown (report.md, summary.md) and `genlab report` as HTML.

A table's cells are values, not text: a float, an int, a string, a list, a (mean, std) pair, None. Each
renderer turns them into text with ``text`` (and the HTML page sorts by ``sort_key``)."""

import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    title: str
    heads: list[str]
    rows: list[list]
    specs: list[str] = field(default_factory=list)  # the format of each column's floats ("" for none)
    best: int | None = None  # the row of the best run
    note: str = ""

    def cells(self, row: list) -> list[str]:
        specs = self.specs or [""] * len(self.heads)
        return [text(v, s) for v, s in zip(row, specs)]


def text(v, spec: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, tuple):  # (mean, std or None)
        m, s = v
        return text(m, spec) if s is None else f"{text(m, spec)} ± {text(s, spec)}"
    if isinstance(v, list):
        return " ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:{spec}}" if spec else f"{v:.4g}"
    return str(v)


def sort_key(v):
    """A cell's value for sorting: numbers by value (a mean by its mean), everything else as text."""
    if isinstance(v, tuple):
        v = v[0]
    if isinstance(v, bool) or v is None:
        return str(v or "")
    return v if isinstance(v, (int, float)) else text(v)


# ---- one report -------------------------------------------------------------------------------------------


def report_title(r: dict) -> str:
    if r.get("kind") == "inspection":
        return f"Inspection: {r['model']} on {r['dataset']} (test split, score {r['score']})"
    if r["task"] == "anomaly":
        return f"Anomaly detection: {r['model']} on {r['dataset']} ({r['split']} split)"
    return f"Sample quality: {r['model']} on {r['dataset']} ({r['weights']} weights)"


def report_tables(r: dict) -> list[Table]:
    """The metrics of one evaluate report, then its classes."""
    if r.get("kind") == "inspection":
        return inspection_tables(r)
    if r["task"] == "anomaly":
        metrics = Table("", ["metric", "value"], [
            ["AUROC", f"{r['auroc']:.4f}"], ["AUPRC (anomalous = positive)", f"{r['auprc']:.4f}"],
            ["score", r["score"]], ["normal classes", ", ".join(map(str, r["normal_classes"]))],
            ["normal / anomalous images", f"{r['n_normal']} / {r['n_anomalous']}"],
            ["checkpoint", f"{r['checkpoint']} (step {r['step']})"]])
        classes = Table("", ["class", "role", "images", "mean score"],
                        [[int(c), v["role"], v["n"], v["mean_score"]] for c, v in r["per_class"].items()],
                        ["", "", "", ".4f"])
        return [metrics, classes]
    rows = []
    if "fid" in r:
        rows += [["FID", f"{r['fid']:.3f}"], ["KID", f"{r['kid']:.5f} ± {r['kid_std']:.5f}"],
                 ["precision", f"{r['precision']:.4f}"], ["recall", f"{r['recall']:.4f}"],
                 ["Inception Score (classifier)", f"{r['inception_score']:.3f} ± {r['inception_score_std']:.3f}"],
                 ["classes covered", f"{r['classes_covered']} of {len(r['class_histogram'])}"]]
    if "class_accuracy" in r:
        rows.append(["samples of the class asked for", f"{r['class_accuracy']:.4f}"])
    if "fid_inception" in r:
        rows.insert(1, ["FID (standard Inception, 2048-d)", f"{r['fid_inception']:.3f}"])
    tables = [Table("", ["metric", "value"], rows)]
    if "class_histogram" in r:
        asked = r.get("class_accuracy_per_class")  # conditional: of the samples asked for class c, the share seen as c
        heads = ["class", "samples", "reference images"] + (["drawn as the class asked for"] if asked else [])
        tables.append(Table("", heads, [
            [c, a, b] + ([asked[c] if c < len(asked) else None] if asked else [])
            for c, (a, b) in enumerate(zip(r["class_histogram"], r["reference_class_histogram"]))],
            ["", "", "", ".3f"][:len(heads)]))
    return tables


def inspection_tables(r: dict) -> list[Table]:
    """An inspection report: image and pixel metrics over all defects and per defect type, then the decision at
    the threshold."""
    heads = ["defects", "images", "image AUROC", "AUPRC", "F1-max", "pixel AUROC", f"AUPRO (FPR ≤ {r.get('pro_limit', 0.3)})",
             "recall at threshold"]
    keys = ["auroc", "auprc", "f1_max", "pixel_auroc", "aupro"]
    rows = [["all", r["n_anomalous"], *(r.get(k) for k in keys), r["threshold"]["recall"]]]
    rows += [[name, d["n"], *(d.get(k) for k in keys), d["recall_at_threshold"]] for name, d in r["per_defect"].items()]
    t = r["threshold"]
    decision = Table(f"At the threshold {t['value']:.5g} ({t['rule']}, chosen on {r['n_validation']} validation images)",
                     ["precision", "recall", "F1", "defects found", "defects missed", "good flagged", "good passed"],
                     [[t["precision"], t["recall"], t["f1"], t["tp"], t["fn"], t["fp"], t["tn"]]],
                     [".4f", ".4f", ".4f", "", "", "", ""])
    about = Table("", ["metric", "value"], [["score", r["score"]], ["good / defective test images",
                  f"{r['n_normal']} / {r['n_anomalous']}"], ["checkpoint", f"{r['checkpoint']} (step {r['step']})"]])
    return [Table("", heads, rows, ["", "", ".4f", ".4f", ".4f", ".4f", ".4f", ".3f"]), decision, about]


def report_notes(r: dict) -> list[str]:
    """The lines under a report's tables: sampling settings, protocol, where the model came from."""
    lines = []
    if r.get("sampling"):
        lines.append("Sampling settings: " + ", ".join(f"{k}={v}" for k, v in r["sampling"].items()))
    lines += [f"{k}: {v}" for k, v in r.get("protocol", {}).items()]
    if r["task"] == "quality":
        lines.append(f"Checkpoint: {r['checkpoint']} (step {r['step']})" if "checkpoint" in r
                     else f"Images: {r['samples']}")
    return lines


def report_markdown(r: dict) -> str:
    lines = [f"# {report_title(r)}", ""]
    for t in report_tables(r):
        lines += markdown(t) + [""]
    return "\n".join(lines + [f"- {n}" for n in report_notes(r)]).rstrip("\n") + "\n"


def markdown(t: Table) -> list[str]:
    out = [f"{t.title}", ""] if t.title else []
    out += [md_row(t.heads), md_row(["---"] * len(t.heads))]
    for i, row in enumerate(t.rows):
        cells = t.cells(row)
        if i == t.best:  # the best run's name in bold
            cells[0] = f"**{cells[0]}** (best)"
        out.append(md_row(cells))
    if t.note:
        out += ["", t.note]
    return out


def md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


# ---- a sweep ----------------------------------------------------------------------------------------------

# the metric columns of each task: (report key, heading, format, higher is better)
COLUMNS = {
    "anomaly": [("auroc", "AUROC", ".4f", True), ("auprc", "AUPRC", ".4f", True)],
    "quality": [("fid", "FID", ".2f", False), ("fid_inception", "FID (Inception)", ".2f", False),
                ("kid", "KID", ".4g", False), ("precision", "precision", ".3f", True), ("recall", "recall", ".3f", True),
                ("inception_score", "IS", ".2f", True), ("classes_covered", "classes covered", ".1f", True),
                ("class_accuracy", "class asked for", ".3f", True)],
}


@dataclass
class Sweep:
    """The reports of a sweep's runs, their statistics over all runs and over each setting's seeds."""
    rows: list[dict]
    columns: list[tuple]  # COLUMNS entries every run has
    settings: dict[str, list[dict]]  # the runs of each setting (the varying overrides but seed=)
    stats: list[tuple[str, int, list[tuple[float, float | None]]]]  # (setting, runs, (mean, std) per column)
    best: int  # the run best by the first column

    @property
    def task(self) -> str:
        return self.rows[0]["task"]

    @property
    def about(self) -> str:
        r = self.rows[0]
        what = f"score {r['score']}" if r["task"] == "anomaly" else f"sample quality ({r['protocol']['n_samples']} samples)"
        return f"{r['model']} on {r['dataset']}, {what}"

    @property
    def title(self) -> str:
        return f"{self.about}: {plural(len(self.rows), 'run')}"


def sweep(rows: list[dict]) -> Sweep:
    cols = [c for c in COLUMNS[rows[0]["task"]] if all(c[0] in r for r in rows)]
    settings = settings_of(rows)
    by_seed = len(settings) > 1 and max(map(len, settings.values())) > 1  # some setting has several seeds
    groups = [("", rows), *(settings.items() if by_seed else ())]
    stats = [(setting, len(group), mean_std([[float(r[key]) for r in group] for key, *_ in cols]))
             for setting, group in groups]
    key, _, _, higher = cols[0]
    values = [float(r[key]) for r in rows]
    best = values.index(max(values) if higher else min(values))
    return Sweep(rows, cols, settings, stats, best)


def sweep_tables(s: Sweep) -> list[Table]:
    """The runs with the mean ± std over them; over each setting's seeds; for a one-class sweep, AUROC per class."""
    heads = [head for _, head, _, _ in s.columns]
    specs = [spec for _, _, spec, _ in s.columns]
    one_class = s.task == "anomaly"
    runs = Table("", ["run", "overrides", *(["normal"] if one_class else []), *heads],
                 [[run_name(r), " ".join(r["overrides"]), *([r["normal_classes"]] if one_class else []),
                   *(r[key] for key, *_ in s.columns)] for r in s.rows],
                 ["", "", *([""] if one_class else []), *specs], s.best)
    runs.rows.append(["mean ± std", "", *([None] if one_class else []), *s.stats[0][2]])
    tables = [runs]
    if len(s.stats) > 1:
        tables.append(Table("Over the seeds of each setting (mean ± sample standard deviation):",
                            ["setting", "runs", *heads], [[setting, n, *ms] for setting, n, ms in s.stats[1:]],
                            ["", "", *specs]))
    per_class = per_class_table(s)
    if per_class is not None:
        tables.append(per_class)
    return tables


def per_class_table(s: Sweep) -> Table | None:
    """A one-class sweep (each run normal on one class, several classes): AUROC and AUPRC per normal class, the
    mean ± std over its seeds when it has several, and the mean over the classes."""
    if s.task != "anomaly" or any(len(r["normal_classes"]) != 1 for r in s.rows):
        return None
    by_class: dict[int, list[dict]] = {}
    for r in s.rows:
        by_class.setdefault(r["normal_classes"][0], []).append(r)
    if len(by_class) < 2:
        return None
    keys = [key for key, *_ in s.columns]
    rows = [[c, len(g), *mean_std([[float(r[k]) for r in g] for k in keys])] for c, g in sorted(by_class.items())]
    means = [[row[2 + i][0] for row in rows] for i in range(len(keys))]
    rows.append(["mean over classes", len(s.rows), *mean_std(means)])
    return Table(f"AUROC per normal class ({s.rows[0]['score']} score):", ["normal class", "runs",
                 *(head for _, head, _, _ in s.columns)], rows, ["", "", *(spec for _, _, spec, _ in s.columns)])


def summary_markdown(s: Sweep) -> str:
    lines = [f"# {s.title}", ""]
    for t in sweep_tables(s):
        lines += markdown(t) + [""]
    lines += ["std: the sample standard deviation (n - 1)."]
    return "\n".join(lines) + "\n"


def summary_csv_rows(s: Sweep) -> list[list[str]]:
    extra = ["normal_classes", "score"] if s.task == "anomaly" else []
    keys = [key for key, *_ in s.columns]
    out = [["run", "overrides", "runs", *extra, *keys]]
    for r in s.rows:
        out.append([run_name(r), " ".join(r["overrides"]), "1", *(text(r[k]) for k in extra),
                    *(f"{float(r[k]):.6f}" for k in keys)])
    for setting, n, ms in s.stats:
        out.append(["mean", setting, str(n), *[""] * len(extra), *(f"{m:.6f}" for m, _ in ms)])
        out.append(["std", setting, str(n), *[""] * len(extra), *("" if d is None else f"{d:.6f}" for _, d in ms)])
    return out


def mean_std(columns: list[list[float]]) -> list[tuple[float, float | None]]:
    """Each column's mean and sample standard deviation (None for a single value)."""
    return [(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None) for v in columns]


def settings_of(rows: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by the overrides that vary across the sweep, leaving out seed=. A group
    whose runs have no overrides of their own is "(none)", or "all runs" when it is the only one."""
    common = set.intersection(*(set(r["overrides"]) for r in rows))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        setting = " ".join(o for o in r["overrides"] if o not in common and not o.startswith("seed="))
        groups.setdefault(setting, []).append(r)
    if "" in groups:
        groups = {(s or ("(none)" if len(groups) > 1 else "all runs")): g for s, g in groups.items()}
    return groups


def run_name(r: dict) -> str:
    return Path(r["checkpoint"]).parent.parent.name


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def headline(r: dict) -> str:
    """One evaluate report's numbers in one line."""
    if r.get("kind") == "inspection":
        pixel = f"  pixel AUROC {r['pixel_auroc']:.4f}  AUPRO {r['aupro']:.4f}" if "pixel_auroc" in r else ""
        return (f"image AUROC {r['auroc']:.4f}  AUPRC {r['auprc']:.4f}  F1-max {r['f1_max']:.4f}{pixel}  (score "
                f"{r['score']}; threshold {r['threshold']['value']:.5g} by {r['threshold']['rule']}: precision "
                f"{r['threshold']['precision']:.3f}, recall {r['threshold']['recall']:.3f})")
    if r["task"] == "anomaly":
        return (f"AUROC {r['auroc']:.4f}  AUPRC {r['auprc']:.4f}  (score {r['score']}, "
                f"normal classes {r['normal_classes']})")
    parts = []
    if "fid" in r:
        parts.append(f"FID {r['fid']:.3f}  KID {r['kid']:.5f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
                     f"IS {r['inception_score']:.2f}  classes covered {r['classes_covered']}/{len(r['class_histogram'])}")
    if "class_accuracy" in r:
        parts.append(f"class asked for {r['class_accuracy']:.3f}")
    if "fid_inception" in r:
        parts.append(f"FID (standard Inception) {r['fid_inception']:.3f}")
    return "  ".join(parts)
