"""Which noise levels make the denoising error of a one-class diffusion model an anomaly score?

For each one-class run (a run directory, or a multirun directory of them), the denoising error of every
image of a seeded subset of the test split at each noise level, and the AUROC of each level alone (the
run's training classes are normal, the rest anomalous). Then the AUROC of the mean error over chosen
ranges of levels. Prints a markdown table; the errors go to --out as .npz for further analysis.

    python scripts/noise_levels.py outputs/oc_ddpm --classes 0,2,3 --n 2000 --out noise_levels
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from genlab.images import as_float
from genlab.parts import load_model, test_split
from genlab.runs import sweep_runs

LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
RANGES = {"0.05-0.4 (genlab before 2026-11-30)": (0.05, 0.4), "0.5-0.9": (0.5, 0.9), "0.6-0.95": (0.6, 0.95),
          "0.3-0.9": (0.3, 0.9), "0.05-0.95": (0.05, 0.95)}


@torch.inference_mode()
def errors(model, images: torch.Tensor, batch_size: int = 250) -> np.ndarray:
    """[len(LEVELS), N] denoising errors, the images in batches of ``batch_size`` (as `evaluate` scores them)."""
    out = [model.denoise_errors(as_float(b), LEVELS) for b in images.split(batch_size)]
    return torch.cat(out, 1).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="one-class run directories, or multirun directories")
    p.add_argument("--n", type=int, default=2000, help="test images scored (a seeded subset; 0: all)")
    p.add_argument("--classes", default="", help="only the runs whose normal class is one of these, e.g. 0,2,3")
    p.add_argument("--dataset-root", default=None)
    p.add_argument("--out", type=Path, default=Path("noise_levels"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [r for run in args.runs for r in (sweep_runs(run) or [run])]
    keep = {int(c) for c in args.classes.split(",") if c}
    table = []
    for run in runs:
        model, cfg, _ = load_model(run, "cpu", ema=True)
        normal = sorted(int(c) for c in cfg.dataset.classes)
        if keep and not keep.intersection(normal):
            continue
        test = test_split(cfg, args.dataset_root)
        pick = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(1))[:args.n or len(test.images)]
        labels = test.labels[pick].numpy()
        anomalous = ~np.isin(labels, normal)
        err = errors(model, test.images[pick])
        np.savez(args.out / f"{run.name}.npz", errors=err, labels=labels, levels=np.array(LEVELS), normal=normal)
        levels = np.array(LEVELS)
        per_level = [roc_auc_score(anomalous, e) for e in err]
        ranges = [roc_auc_score(anomalous, err[(levels >= lo - 1e-9) & (levels <= hi + 1e-9)].mean(0))
                  for lo, hi in RANGES.values()]
        table.append((normal, per_level, ranges))
        print(f"normal {normal}: " + " ".join(f"{a:.3f}" for a in per_level) + " | "
              + " ".join(f"{a:.3f}" for a in ranges), flush=True)

    print("\nAUROC of each noise level alone (fraction of the path):\n")
    print("| normal | " + " | ".join(f"{lv:g}" for lv in LEVELS) + " |")
    print("|---" * (len(LEVELS) + 1) + "|")
    for normal, per_level, _ in table:
        print(f"| {normal} | " + " | ".join(f"{a:.3f}" for a in per_level) + " |")
    print("\nAUROC of the mean error over a range of levels:\n")
    print("| normal | " + " | ".join(RANGES) + " |")
    print("|---" * (len(RANGES) + 1) + "|")
    for normal, _, ranges in table:
        print(f"| {normal} | " + " | ".join(f"{a:.3f}" for a in ranges) + " |")


if __name__ == "__main__":
    main()
