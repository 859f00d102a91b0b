"""Sample quality against the number of sampling steps: a table and a plot.

For each run and sampler, `genlab evaluate task=quality` at each number of steps (the same protocol,
seed and number of samples throughout), then FID, precision and recall against the network
evaluations the samples cost (Heun takes two a step, but the last), and a montage of each point's samples
(grids.png). Every sampler that fits the run's model
(genlab.samplers.sampler_names) is measured, or those of --samplers.

    python scripts/sampling_steps.py outputs/train/DDPM_RUN outputs/train/FLOW_RUN --steps 5,10,20,50,100 \\
        --n 2000 --out docs/sampling_steps
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from genlab import schema  # noqa: E402
from genlab.config import CONFIG_DIR  # noqa: E402
from genlab.device import resolve_device  # noqa: E402
from genlab.parts import load_model  # noqa: E402
from genlab.quality import quality_report  # noqa: E402
from genlab.samplers import make_sampler, sampler_names  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--steps", default="5,10,20,50,100")
    p.add_argument("--n", type=int, default=2000, help="samples per point")
    p.add_argument("--out", type=Path, default=Path("sampling_steps"))
    p.add_argument("--samplers", default="", help="only these samplers, comma-separated (e.g. ddim,euler); default all")
    p.add_argument("--extra", default="", help="more evaluate overrides, comma-separated (sampling settings with ++: ++guidance=3)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    schema.register()
    rows = []
    for run in args.runs:
        model = load_model(run)[0]
        name = type(model).__name__
        for sampler in [s for s in sampler_names(model) if not args.samplers or s in args.samplers.split(",")]:
            for steps in map(int, args.steps.split(",")):
                overrides = [f"ckpt={run}", "task=quality", f"n_samples={args.n}", f"sampler={sampler}",
                             f"++steps={steps}", *filter(None, args.extra.split(","))]
                with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                    cfg = compose("evaluate", overrides=overrides)
                r = quality_report(run, args.out / f"{run.name}-{sampler}-{steps}", cfg, device)
                rows.append({"run": run.name, "model": name, "sampler": sampler, "steps": steps,
                             "evaluations": make_sampler(sampler).evaluations(steps), "fid": r["fid"], "precision": r["precision"],
                             "recall": r["recall"], "classes_covered": r["classes_covered"]})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "steps.json").write_text(json.dumps(rows, indent=2) + "\n")
    write(rows, args.out, args.n)
    montage(rows, args.out)
    print((args.out / "steps.md").read_text())


def write(rows: list[dict], out: Path, n: int) -> None:
    """steps.md (the table) and steps.png (FID against network evaluations, log-log), a line per run and sampler."""
    lines = ["| run | model | sampler | steps | network evaluations | FID | precision | recall | classes |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['model']} | {r['sampler']} | {r['steps']} | {r['evaluations']} | {r['fid']:.2f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['classes_covered']} |" for r in rows]
    (out / "steps.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key in dict.fromkeys((r["run"], r["model"], r["sampler"]) for r in rows):
        pts = [(r["evaluations"], r["fid"]) for r in rows if (r["run"], r["model"], r["sampler"]) == key]
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]}: {key[1]} ({key[2]})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = min(r["evaluations"] for r in rows), max(r["evaluations"] for r in rows)
    ax.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo / 1.1 <= t <= hi * 1.1])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel(f"FID (genlab classifier, {n} samples)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "steps.png")


def montage(rows: list[dict], out: Path) -> None:
    """grids.png: each point's first 64 samples (its samples.png), a row per run and sampler, a column per steps."""
    keys = list(dict.fromkeys((r["run"], r["sampler"]) for r in rows))
    steps = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(len(keys), len(steps), figsize=(2.1 * len(steps), 2.35 * len(keys)), dpi=110,
                             squeeze=False)
    for (run, sampler), row in zip(keys, axes):
        for s, ax in zip(steps, row):
            ax.axis("off")
            point = [r for r in rows if (r["run"], r["sampler"], r["steps"]) == (run, sampler, s)]
            if point:
                ax.imshow(plt.imread(out / f"{run}-{sampler}-{s}" / "samples.png"), cmap="gray")
                ax.set_title(f"{run} ({sampler})\n{s} steps: FID {point[0]['fid']:.1f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grids.png")


if __name__ == "__main__":
    main()
