"""Do two measuring sticks rank models alike? Each checkpoint's samples measured in the features of genlab's
classifier for the dataset (the narrow ResNet-9 for colour images) and of the small CNN, against the test split.

    python scripts/yardsticks.py RUN_DIR [RUN_DIR ...] [--n 10000] [--dataset-root ../shared/data]

Prints each classifier's test accuracy, a floor row (the training split measured as if it were samples), and per
checkpoint and classifier: FID, KID, precision, recall, classes covered.
"""

import argparse
import time

import torch
from omegaconf import OmegaConf

from genlab.classifier import classifier_for
from genlab.images import as_float
from genlab.parts import load_model, test_split
from genlab.quality import classifier_metrics
from genlab.sampling import draw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=10000, help="samples per checkpoint")
    p.add_argument("--dataset-root", default=None)
    args = p.parse_args()
    device = torch.device("cpu")
    models = []
    for run in args.runs:
        model, cfg, state = load_model(run, device)
        if args.dataset_root:
            cfg.dataset.root = args.dataset_root
        models.append((run, model, cfg, int(state["step"])))
    dataset = models[0][2].dataset
    sticks = {}
    for kind in ("resnet", "small"):
        t0 = time.perf_counter()
        net, info = classifier_for(dataset, device, kind=kind)
        sticks[kind] = net
        print(f"{kind}: {info['architecture']}, test accuracy {info['test_accuracy']:.4f} "
              f"({time.perf_counter() - t0:.0f} s to train or load)", flush=True)
    real = test_split(OmegaConf.create({"dataset": dataset})).images
    train = test_split(OmegaConf.create({"dataset": dataset}), train=True).images[: args.n]
    print("| samples | classifier | FID | KID | precision | recall | classes covered |\n|---|---|---|---|---|---|---|")
    rows = [("training split (the floor)", as_float(train), None)]
    for run, model, cfg, step in models:
        fake, labels = draw(model, args.n, None, 0, "auto", "false", 250, command="evaluate")
        rows.append((f"{run} (step {step})", fake, labels))
    for name, fake, labels in rows:
        for kind, net in sticks.items():
            m = classifier_metrics(net, real, fake, labels, device)
            print(f"| {name} | {kind} | {m['fid']:.1f} | {1000 * m['kid']:.1f} | {m['precision']:.3f} | "
                  f"{m['recall']:.3f} | {m['classes_covered']} / 10 |", flush=True)


if __name__ == "__main__":
    main()
