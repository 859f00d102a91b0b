"""Anomaly-detection metrics and thresholds for inspection datasets in the MVTec AD layout, used by
`genlab evaluate` and `genlab predict`: image-level AUROC, AUPRC and F1-max, pixel-level AUROC and AUPRO, and the
rules that turn anomaly scores into a decision threshold. Plain functions on numpy arrays, returning floats.

``labels`` are 1 (or True) for anomalous images, ``scores`` higher for more anomalous; ``masks`` are the ground
truth masks [N, H, W] or [N, 1, H, W] (nonzero = defect), ``maps`` the anomaly maps of the same shape.
"""

import math
import numbers

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from genlab.errors import GenlabError

RULES = '"f1_max", "quantile:Q" (0 < Q <= 1), "fpr:X" (0 <= X <= 1) or a number (a fixed threshold)'

# MVTec AD's reference code labels regions with a 3x3 all-ones structure (8-connectivity); the zero planes either
# side keep the images of a stack [N, H, W] apart, so one call labels them all
_REGIONS = np.zeros((3, 3, 3), dtype=bool)
_REGIONS[1] = True


def _labels(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels as bool [N] and scores as float [N], checked: same length, labels 0/1, scores finite."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise GenlabError(f"{labels.size} labels but {scores.size} scores: each image needs one of each.")
    if not np.isin(labels, (0, 1)).all():
        raise GenlabError(f"labels must be 0 (normal) or 1 (anomalous), not {sorted(set(labels.tolist()))[:5]}.")
    return labels.astype(bool), _finite(scores, f"of {scores.size} scores")


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as floats, refused where any is not finite."""
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise GenlabError(f"{int((~np.isfinite(values)).sum())} {what} are not finite.")
    return values


def _both_classes(labels: np.ndarray, what: str = "images") -> None:
    """Raise unless ``labels`` holds both normal and anomalous entries."""
    n_bad = int(labels.sum())
    if n_bad == 0 or n_bad == labels.size:
        kind = "normal" if n_bad == 0 else "anomalous"
        raise GenlabError(f"all {labels.size} {what} are {kind}: detection metrics need both normal and "
                          "anomalous ones.")


def f1_max(labels, scores) -> tuple[float, float]:
    """The best F1 over all thresholds and the threshold reaching it (anomalous where score >= threshold), from
    scikit-learn's precision_recall_curve; a point with precision and recall both 0 has F1 0."""
    labels, scores = _labels(labels, scores)
    _both_classes(labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (1, 0) has no threshold
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def image_metrics(labels, scores) -> dict:
    """Image-level {"auroc", "auprc", "f1_max", "f1_threshold"} of anomaly ``scores`` against ``labels``."""
    labels, scores = _labels(labels, scores)
    _both_classes(labels)
    f1, t = f1_max(labels, scores)
    return {"auroc": float(roc_auc_score(labels, scores)), "auprc": float(average_precision_score(labels, scores)),
            "f1_max": f1, "f1_threshold": t}


def at_threshold(labels, scores, t: float) -> dict:
    """Precision, recall, F1 and the counts tp, fp, tn, fn when images with score >= ``t`` are called anomalous;
    a ratio with nothing to divide by is 0.0."""
    labels, scores = _labels(labels, scores)
    flagged = scores >= t
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    fn, tn = int((~flagged & labels).sum()), int((~flagged & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _pixels(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Masks as bool [N, H, W] and maps as float [N, H, W] (a channel axis of 1 dropped), checked."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        raise GenlabError(f"masks {masks.shape} and anomaly maps {maps.shape} must have the same shape.")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks, maps = masks[:, 0], maps[:, 0]
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3:
        raise GenlabError(f"masks and anomaly maps must be [N, H, W] or [N, 1, H, W], not {masks.shape}.")
    return masks.astype(bool), _finite(maps, "anomaly map pixels")


def pixel_auroc(masks, maps) -> float:
    """AUROC over all pixels of all images: the chance that a defect pixel scores above a normal one, ties
    counting half (the Mann-Whitney form, equal to scikit-learn's roc_auc_score). It sorts the normal pixels and
    looks each defect pixel up among them: for 10 million float32 pixels on 2 cores, 0.15 s with 10 % defect
    pixels and 0.7 s with half (1 s in float64), where roc_auc_score takes about 5 s. aupro takes about 1.6 s."""
    masks, maps = _pixels(masks, maps)
    _both_classes(masks.ravel(), "pixels")
    normal = np.sort(maps[~masks])
    defect = np.sort(maps[masks])  # sorted lookups run faster
    below = np.searchsorted(normal, defect, side="left")
    upto = np.searchsorted(normal, defect, side="right")
    wins = below.sum(dtype=np.float64) + 0.5 * (upto - below).sum(dtype=np.float64)
    return float(wins / (defect.size * normal.size))


def _pro_curve(regions: np.ndarray, n_regions: int, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct map value from the highest down, starting at (0, 0). ``regions`` [P] holds
    each pixel's region (0 = normal), ``maps`` [P] its score. Exact: each defect pixel of region r adds
    1 / (|r| n_regions) to PRO, each normal pixel 1 / n_normal to FPR, and tied scores count as one step."""
    sizes = np.bincount(regions)  # sizes[0]: normal pixels
    per_pixel = np.zeros(sizes.size)
    per_pixel[1:] = 1.0 / (sizes[1:] * n_regions)
    order = np.argsort(maps)[::-1]
    ranked, ranked_regions = maps[order], regions[order]
    ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)  # the last of each tie
    fpr = np.cumsum(ranked_regions == 0)[ends] / sizes[0]
    pro = np.cumsum(per_pixel[ranked_regions])[ends]
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x), x non-decreasing, from x[0] up to ``limit`` (y interpolated there)."""
    cut = int(np.searchsorted(x, limit, side="right"))  # the first point past the limit
    xs, ys = x[:cut], y[:cut]
    if cut < x.size and xs[-1] < limit:
        y_at = y[cut - 1] + (y[cut] - y[cut - 1]) * (limit - x[cut - 1]) / (x[cut] - x[cut - 1])
        xs, ys = np.append(xs, limit), np.append(ys, y_at)
    return float(np.trapezoid(ys, xs))


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to false-positive rate ``fpr_limit``, divided by it (a perfect
    map gives 1.0), as in MVTec AD (Bergmann et al. 2021). Regions are the connected components of each image's
    mask under scipy.ndimage.label with a 3x3 all-ones structure (8-connectivity), as in MVTec's reference code.
    At threshold t a pixel is called anomalous where map >= t; PRO(t) is the mean over all regions of all images
    of the share of the region called anomalous, FPR(t) the share of normal pixels (outside every mask) called
    anomalous. Images without defects only add normal pixels. Exact, from one sort of all pixels."""
    if not 0 < fpr_limit <= 1:
        raise GenlabError(f"fpr_limit must be in (0, 1], not {fpr_limit}.")
    masks, maps = _pixels(masks, maps)
    regions, n_regions = ndimage.label(masks, structure=_REGIONS)
    if n_regions == 0:
        raise GenlabError("the masks hold no defect region: AUPRO needs at least one.")
    if masks.all():
        raise GenlabError("the masks cover every pixel: AUPRO needs normal pixels too.")
    fpr, pro = _pro_curve(regions.ravel(), n_regions, maps.ravel())
    return _area_to(fpr, pro, fpr_limit) / fpr_limit


def _number(text: str) -> float | None:
    """``text`` as a finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_rule(rule) -> tuple[str, float | None]:
    """A threshold rule checked and split into (kind, value): ("f1_max", None), ("quantile", Q), ("fpr", X) or
    ("fixed", t). Raises GenlabError naming the accepted forms for anything else."""
    bad = GenlabError(f"threshold rule {rule!r} is not one of: {RULES}.")
    if isinstance(rule, bool) or not isinstance(rule, (str, numbers.Real)):
        raise bad
    if not isinstance(rule, str):
        if not math.isfinite(rule):
            raise bad
        return "fixed", float(rule)
    text = rule.strip()
    if text == "f1_max":
        return "f1_max", None
    kind, _, value = text.partition(":")
    number = _number(value)
    if kind == "quantile" and number is not None and 0 < number <= 1:
        return "quantile", number
    if kind == "fpr" and number is not None and 0 <= number <= 1:
        return "fpr", number
    if number is None and (fixed := _number(text)) is not None:
        return "fixed", fixed
    raise bad


def fpr_threshold(normal_scores, x: float) -> float:
    """The smallest threshold t at which at most a share ``x`` of ``normal_scores`` is >= t. With k = floor(x n)
    false positives allowed, t is the next float above the (k+1)-th highest normal score, in the scores' own
    precision so that comparing in it keeps the count; with k >= n it is the lowest normal score."""
    scores = np.sort(np.asarray(normal_scores).ravel())[::-1]
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    k = math.floor(x * scores.size + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floating point
    if k >= scores.size:
        return float(scores[-1])
    return float(np.nextafter(scores[k], scores.dtype.type(np.inf)))


def threshold(rule, normal_scores, scores=None, labels=None) -> float:
    """A decision threshold (anomalous where score >= it) by ``rule``: "f1_max" (the F1-max threshold of the
    labelled ``scores``), "quantile:Q" (the Q quantile of ``normal_scores``), "fpr:X" (see fpr_threshold) or a
    number (that threshold)."""
    kind, value = parse_rule(rule)
    if kind == "fixed":
        return value
    if kind == "f1_max":
        labelled = labels is not None and scores is not None and np.size(labels) > 0
        if not labelled or np.asarray(labels).all() or not np.asarray(labels).any():
            raise GenlabError("threshold rule f1_max needs a validation set with both normal and anomalous labelled "
                              "images, and this one has no labelled anomalies (or no normal images): use "
                              "quantile:0.99 or fpr:0.01, which need normal images only.")
        return f1_max(labels, scores)[1]
    normal_scores = np.asarray(normal_scores if normal_scores is not None else []).ravel()
    if normal_scores.size == 0:
        raise GenlabError(f"threshold rule {rule!r} needs the scores of normal images, and there are none.")
    if not np.isfinite(normal_scores.astype(np.float64)).all():
        raise GenlabError("some normal scores are not finite: no threshold can be read from them.")
    if kind == "quantile":
        return float(np.quantile(normal_scores, value))
    return fpr_threshold(normal_scores, value)
