"""FID against training time: one line per run, from the eval/fid its metrics.csv holds (a run trained with
evaluation.metrics=[eval/fid]: measured at each epoch's end and at the last step, none of it training time).

    genlab train experiment=flow_mnist_cpu dataset.root=PATH trainer.max_time=15m evaluation.metrics=[eval/fid]
    python scripts/fid_over_time.py RUN_A RUN_B --labels "flow_mnist_cpu,flow_mnist" --out fid_over_time.png
"""

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def measurements(run: Path) -> list[tuple[float, int, float]]:
    """(training minutes, step, FID) of each row of ``run``'s metrics.csv that has an eval/fid."""
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/fid")]
    if not rows:
        raise SystemExit(f"{run}/metrics.csv has no eval/fid: train with evaluation.metrics=[eval/fid]")
    return [(float(r["wall_time"]) / 60, int(r["step"]), float(r["eval/fid"])) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", default="", help="a label per run, comma-separated (default: the folder names)")
    p.add_argument("--out", type=Path, default=Path("fid_over_time.png"))
    args = p.parse_args()
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    print("| run | minutes | step | FID |\n|---|---|---|---|")
    for run, label in zip(args.runs, labels):
        points = measurements(run)
        for minutes, step, fid in points:
            print(f"| {label} | {minutes:.1f} | {step:,} | {fid:.1f} |")
        ax.plot([m for m, _, _ in points], [f for _, _, f in points], marker="o", label=label)
    ax.set(xlabel="training time (minutes)", ylabel="FID (genlab's yardstick)", yscale="log",
           title="FID against training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
