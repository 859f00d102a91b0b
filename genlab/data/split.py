"""Which images of a folder dataset are its test images, and the record of that split a run's checkpoint keeps.

The rule is a function of each file's name alone (its path under the folder): a stable hash of the name, a number
in [0, 1), below ``test_fraction`` makes a test image. Adding or removing files never moves another file between
training and test, so a later `genlab evaluate` never scores or calibrates on images the model trained on. Runs
trained before that rule split by ``order`` (the sorted file list shuffled with seed 0, which one added file
reshuffles); their checkpoints keep that rule. A run records its split (``record``) in its checkpoint's
``dataset.split``; when the folder's split differs at evaluate, sample or resume time, one warning says how."""

import hashlib
import logging
import unicodedata
from collections.abc import Mapping

import torch

from genlab.errors import GenlabError

log = logging.getLogger(__name__)

RULES = ("name", "order")
_warned = set()  # (folder, recorded digest, digest now): each change is told once a process


def position(name: str) -> float:
    """Where a file's name (its path under the folder, with '/') falls in [0, 1): its BLAKE2b hash, the same on
    every machine and Python and whatever other files there are."""
    digest = hashlib.blake2b(unicodedata.normalize("NFC", name).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def by_name(names: list[str], test_fraction: float) -> list[bool]:
    """Whether each file is a test image: its ``position`` is below ``test_fraction``. One image trains. Where two or
    more images leave a side empty though its share is above 0 (a handful of images), the image nearest the line
    crosses it: the lowest position tests, or the highest trains."""
    u = [position(n) for n in names]
    if len(u) < 2:
        return [False] * len(u)
    test = [x < test_fraction for x in u]
    if test_fraction > 0 and not any(test):
        test[u.index(min(u))] = True
    if test_fraction < 1 and all(test):
        test[u.index(max(u))] = False
    return test


def by_order(n: int, test_fraction: float) -> list[bool]:
    """genlab 0.1's rule, kept for the runs trained with it: the first round(test_fraction * n) of a shuffle with
    seed 0 of the sorted files test (none of a single image)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    test = [False] * n
    for i in order[:int(round(test_fraction * n)) if n > 1 else 0]:
        test[i] = True
    return test


def record(names: list[str], test: list[bool], rule: str) -> dict:
    """What a checkpoint keeps of a split: its rule, how many images and test images, and a digest of the sorted
    names of the test images (16 hex digits)."""
    chosen = sorted(n for n, t in zip(names, test) if t)
    digest = hashlib.blake2b("\n".join(chosen).encode(), digest_size=8).hexdigest()
    return {"rule": rule, "images": len(names), "test": len(chosen), "digest": digest}


def divide(names: list[str], test_fraction: float, split, root) -> tuple[list[bool], dict]:
    """(whether each file of ``names``, in the folder's sorted order, is a test image; the split's ``record``).
    ``split``: a rule of RULES, or the record a run's checkpoint kept (its rule is used, and a change since is
    warned about)."""
    recorded = dict(split) if isinstance(split, Mapping) else {"rule": split}
    rule = recorded.get("rule")
    if rule not in RULES:
        raise GenlabError(f"dataset.split must be {' or '.join(RULES)} (or the record a run's checkpoint keeps); "
                          f"got {split!r}.")
    test = by_name(names, test_fraction) if rule == "name" else by_order(len(names), test_fraction)
    now = record(names, test, rule)
    if recorded.get("digest") not in (None, now["digest"]):
        warn_changed(recorded, now, [n for n, t in zip(names, test) if t and position(n) >= test_fraction], root)
    return test, now


def warn_changed(recorded: dict, now: dict, crossed: list[str], root) -> None:
    """One line: the folder's test split is not the one the run recorded, and how many of the images it trained on
    may be in it now. By name, none: only an image moved across the line of a tiny folder (``crossed``) may have
    trained, or a file renamed since (a new name, which genlab cannot tell from a new file)."""
    key = (str(root), recorded["digest"], now["digest"])
    if key in _warned:
        return
    _warned.add(key)
    if now["rule"] == "name":
        trained = f"{'at most ' if crossed else ''}{len(crossed)} of the images it trained on {'is' if crossed else 'are'}"
        why = f"by their names {trained} in the test split now (a training image renamed since would be too)"
    else:
        why = ("this run split the folder by order (genlab 0.1), which an added or removed file reshuffles: most of "
               "its test images now may be images it trained on; train again for a clean test split")
    log.warning("dataset=folder: the test split of %s changed since this run recorded it (%s images, %s for test "
                "then; %d and %d now): %s.", root, recorded.get("images", "?"), recorded.get("test", "?"),
                now["images"], now["test"], why)
