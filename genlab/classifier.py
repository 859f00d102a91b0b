"""genlab's measuring stick: a classifier per dataset, trained once on its training split and cached.

Its 128-d features stand in for Inception features (FID, KID, precision/recall) and its class
probabilities for the Inception Score and the class-coverage check. Grey images (digits, MNIST,
Fashion-MNIST) get a small CNN, 3 passes with Adam (99 % on MNIST); colour images (CIFAR-10, a folder
of photos) a narrow ResNet-9 trained the way that network is, 10 passes of SGD with flips and shifts
(the small CNN's recipe reaches too little on CIFAR-10 to measure anything: docs/results.md).
"""

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from genlab import checkpoint
from genlab.data import cache_dir
from genlab.errors import GenlabError, first_line
from genlab.images import as_float
from genlab.nets.classifier import ResNetClassifier, SmallCNN
from genlab.parts import build_dataset

log = logging.getLogger(__name__)

VERSION = 2  # bump when the classifier or its training changes: old caches are then not used (2: trained in fp32)
NETS = {"small": SmallCNN, "resnet": ResNetClassifier}
MIN_PER_CLASS = 50  # fewer training images of a class than this, and the classifier is not trusted


class NoClassifier(GenlabError):
    """The dataset cannot train a measuring stick: one class only, or too few images."""


def classifier_for(dataset: DictConfig, device, epochs: int | None = None, width: int = 16, seed: int = 0,
                   min_steps: int = 600, kind: str | None = None):
    """The dataset's classifier (all classes), trained now if no cached one matches; (net, info). ``kind``: small or
    resnet (None: the small CNN for grey images, the ResNet for colour); ``epochs`` (None: its recipe's) are raised
    to make at least ``min_steps`` steps on a small dataset."""
    node = OmegaConf.to_container(dataset, resolve=True)
    node["classes"] = None
    for how in ("in_memory", "workers", "fraction"):  # how the images are held or decoded, or a run's share of them:
        # the same classifier, so that a run on a fraction of the data is measured as one on all of it
        node.pop(how, None)
    if isinstance(node.get("root"), str):  # where the data lies, however it was spelt: ../data and /abs/data are one
        node["root"] = str(Path(node["root"]).expanduser().resolve())
    colour = node.get("channels") == 3 and node.get("image_size", 0) % 8 == 0  # the ResNet halves 3 times
    kind = kind or ("resnet" if colour else "small")
    epochs = epochs or {"small": 3, "resnet": 10}[kind]
    # everything its weights depend on: the data, the recipe, and where it was trained (always in fp32, so that
    # one yardstick means the same on every GPU; CPU and CUDA kernels still round differently)
    spec = {"dataset": node, "epochs": epochs, "width": width, "seed": seed, "min_steps": min_steps, "version": VERSION,
            "precision": "fp32", "device": torch.device(device).type, **({"net": kind} if kind != "small" else {})}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    name = node["_target_"].rsplit(".", 1)[-1]
    path = cache_dir() / "classifiers" / f"{name}-{key}.pt"
    found = cached_classifier(path, device)
    if found is None:
        with checkpoint.file_lock(path.with_suffix(".lock")):  # one process trains it, others (sweep jobs) wait
            found = cached_classifier(path, device) or train_classifier(node, kind, epochs, width, seed, min_steps,
                                                                        device, path)
    return found


def cached_classifier(path, device):
    """(net, info) from the cache file ``path``, or None where there is none or it cannot be read (its checksum is
    checked: a yardstick changed on disk is never used; a damaged one is trained again)."""
    if not path.exists():
        return None
    try:
        blob = checkpoint.read(path)
        net = NETS[blob.get("net", "small")](**blob["args"])
        net.load_state_dict(blob["state"])
        return net.to(device).eval(), blob["info"]
    except (checkpoint.Damaged, KeyError, RuntimeError, TypeError) as e:
        log.warning("ignoring the unreadable classifier cache %s (%s); training it again", path, first_line(e))
        return None


def train_classifier(node: dict, kind: str, epochs: int, width: int, seed: int, min_steps: int, device, path):
    """Train the classifier of the dataset config ``node`` and keep it at ``path``: (net, info)."""
    train, test = build_dataset(OmegaConf.create(node), True), build_dataset(OmegaConf.create(node), False)
    counts = train.labels.bincount()
    present = counts[counts > 0]
    if len(present) < 2:
        raise NoClassifier(f"task=quality measures samples in the features of a classifier trained on the labels of "
                           f"{train.name}'s training split, and it has a single class, so there is nothing to learn.")
    if int(present.min()) < MIN_PER_CLASS or len(test) == 0:
        raise NoClassifier(f"task=quality measures samples in the features of a classifier trained on {train.name}'s "
                           f"training split, and it is too small to train one: {len(train)} images, the fewest of a "
                           f"class {int(present.min())} (at least {MIN_PER_CLASS} a class are needed), {len(test)} test "
                           "images.")
    args = {"channels": train.image_shape[0], "image_size": train.image_shape[1],
            "n_classes": int(train.labels.max()) + 1, "width": width}
    epochs = max(epochs, -(-min_steps // (len(train) // min(BATCH[kind], len(train)))))  # small datasets: more passes
    net, info = fit_classifier(train, test, kind, args, device, epochs, seed)
    try:  # whole or not at all, even with several processes building it at once
        checkpoint.write({"net": kind, "args": args, "state": net.state_dict(), "info": info}, path)
    except (OSError, RuntimeError) as e:
        log.warning("could not write the classifier cache %s (%s); training it each time", path, e)
    log.info("classifier for %s: test accuracy %.4f (cached at %s)", train.name, info["test_accuracy"], path)
    return net.eval(), info


BATCH = {"small": 128, "resnet": 256}


def fit_classifier(train, test, kind: str, args: dict, device, epochs: int, seed: int):
    """``kind`` small: Adam with a one-cycle schedule. resnet: the ResNet-9 recipe (Page, DAWNBench): SGD with
    Nesterov momentum and weight decay, a linear one-cycle, label smoothing, and each image flipped and shifted
    by up to 4 pixels at random. Both in fp32: one yardstick on every device."""
    torch.manual_seed(seed)
    device = torch.device(device)
    net = NETS[kind](**args).to(device)
    batch = min(BATCH[kind], len(train))  # a dataset smaller than a batch: one batch of all of it a pass
    steps = epochs * (len(train) // batch)
    if kind == "resnet":
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=steps, pct_start=0.25,
                                                    anneal_strategy="linear")
    else:
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    smoothing = 0.2 if kind == "resnet" else 0.0
    images, labels = train.images.to(device), train.labels.to(device)
    g = torch.Generator().manual_seed(seed)
    net.train()
    with tqdm(total=steps, desc=f"classifier for {train.name}", unit="step", disable=None) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=g).to(device)
            for idx in order[: len(order) // batch * batch].view(-1, batch):
                x = as_float(images[idx])
                if kind == "resnet":
                    x = flip_and_shift(x, g)
                loss = F.cross_entropy(net(x), labels[idx], label_smoothing=smoothing)  # fp32: one yardstick everywhere
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    net.eval()
    probs = predict(net, test.images, device)[1]
    acc = float((probs.argmax(1) == test.labels).float().mean())
    info = {"dataset": train.name, "n_train": len(train), "n_test": len(test), "test_accuracy": acc,
            "epochs": epochs, "architecture": f"{type(net).__name__}(width={args['width']}), "
                                              f"{net.head.in_features}-d features"}
    return net, info


def flip_and_shift(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Each image of ``x`` [B, C, H, W] mirrored left-right with probability 1/2 and shifted by up to ``pad`` pixels
    each way (its border reflected into the gap), drawn from ``g``."""
    b, c, h, w = x.shape
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device) for _ in range(2))
    rows = (torch.arange(h, device=x.device) + dy[:, None]).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    cols = (torch.arange(w, device=x.device) + dx[:, None]).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.inference_mode()
def predict(net, images: torch.Tensor, device, batch_size: int = 1000):
    """Features [N, 128] and class probabilities [N, K] of uint8 or [0, 1] float images, on the CPU."""
    feats, probs = [], []
    for b in images.split(batch_size):
        x = as_float(b, device)
        f = net.features(x).float()
        feats.append(f.cpu())
        probs.append(F.softmax(net.head(f).float(), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)
