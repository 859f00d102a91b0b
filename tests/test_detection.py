"""genlab.detection against hand-computed cases and scikit-learn: AUPRO on masks whose regions and overlaps are
known, F1-max, pixel AUROC, the threshold rules and the counts at a threshold."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from genlab.detection import aupro, at_threshold, f1_max, image_metrics, parse_rule, pixel_auroc, threshold
from genlab.errors import GenlabError


@pytest.fixture
def inspection():
    """Two 4x4 images. Image 0 holds region A (6 pixels, rows 0-1, columns 0-2) and region B (2 pixels, row 3,
    columns 2-3), 8 normal pixels; image 1 is clean, 16 normal pixels: 24 normal pixels in all. The map gives
    B 4; half of A (3 pixels) and 6 normal pixels 3; the other half of A and 6 more normal pixels 2; the rest 0."""
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0:2, 0:3] = True  # A
    masks[0, 3, 2:4] = True  # B
    maps = np.zeros((2, 4, 4))
    maps[0, 3, 2:4] = 4
    maps[0, 0, 0:3] = 3
    maps[0, 1, 0:3] = 2
    maps[1].flat[:6] = 3
    maps[1].flat[6:12] = 2
    return masks, maps


# the curve (FPR, PRO) by hand: t = 4: B covered, PRO (0 + 1) / 2, FPR 0; t = 3: half of A, PRO (1/2 + 1) / 2,
# FPR 6/24; t = 2: all of A, PRO 1, FPR 12/24; t = 0: FPR 1
CURVE = [(0, 0), (0, 0.5), (0.25, 0.75), (0.5, 1.0), (1.0, 1.0)]


def test_aupro_by_hand(inspection):
    masks, maps = inspection
    up_to_quarter = (0.5 + 0.75) / 2 * 0.25  # the trapezoid from FPR 0 to 0.25
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(up_to_quarter / 0.25)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(up_to_quarter + (0.75 + 1) / 2 * 0.25 + 0.5)


def test_aupro_cut_at_the_limit_by_interpolation(inspection):
    masks, maps = inspection
    pro_at_limit = 0.75 + (1.0 - 0.75) * (0.3 - 0.25) / (0.5 - 0.25)  # 0.8, between the points at 0.25 and 0.5
    area = (0.5 + 0.75) / 2 * 0.25 + (0.75 + pro_at_limit) / 2 * 0.05
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(area / 0.3)  # 0.65
    assert aupro(masks[:, None], maps[:, None], fpr_limit=0.3) == pytest.approx(area / 0.3)  # [N, 1, H, W]


def test_aupro_perfect_and_inverted_maps(inspection):
    masks, _ = inspection
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0)
    noise = np.random.default_rng(0).random(masks.shape) * 0.1
    assert aupro(masks, 1.0 - masks + noise) < 0.01


def test_aupro_regions_are_8_connected():
    """Pixels (0, 0), (1, 1), (1, 2): one region with the 3x3 structure (PRO 1/3 when the map finds (0, 0)),
    two under 4-connectivity (PRO (1 + 0) / 2)."""
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0] = 1
    # curve (0, 0), (0, 1/3), (1, 1)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx((1 / 3 + 1) / 2)


def test_aupro_regions_do_not_join_across_images():
    """Pixel (0, 0) of image 0, pixels (0, 0), (0, 1) of image 1: two regions (PRO 1/2 when the map finds image
    0's), not one of three pixels (PRO 1/3)."""
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 0, 0] = 1
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx((0.5 + 1) / 2)


def test_aupro_refuses_what_it_cannot_measure(inspection):
    masks, maps = inspection
    with pytest.raises(GenlabError, match="no defect region"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(GenlabError, match="normal pixels"):
        aupro(np.ones_like(masks), maps)
    with pytest.raises(GenlabError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0)
    with pytest.raises(GenlabError, match="same shape"):
        aupro(masks, maps[:1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_equals_scikit_learn(dtype):
    rng = np.random.default_rng(1)
    masks = rng.random((3, 1, 20, 30)) < 0.2
    maps = (np.round(rng.random(masks.shape) * 20) / 20 + 0.3 * masks).astype(dtype)  # ties on purpose
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), rel=1e-12)
    with pytest.raises(GenlabError, match="both normal and anomalous"):
        pixel_auroc(np.zeros_like(masks), maps)


def test_f1_max_equals_scikit_learn():
    rng = np.random.default_rng(2)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # ties
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best = np.argmax(f1[:-1])
    f1_best, t = f1_max(labels, scores)
    assert f1_best == pytest.approx(f1[best]) and t == thresholds[best]
    assert at_threshold(labels, scores, t)["f1"] == pytest.approx(f1_best)  # the rule is score >= t


def test_image_metrics_equal_scikit_learn():
    rng = np.random.default_rng(3)
    labels = (rng.random(100) < 0.4).astype(int)
    scores = rng.normal(size=100) + labels
    metrics = image_metrics(labels, scores)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["auprc"] == pytest.approx(average_precision_score(labels, scores))
    assert (metrics["f1_max"], metrics["f1_threshold"]) == f1_max(labels, scores)
    with pytest.raises(GenlabError, match="all 100 images are normal"):
        image_metrics(np.zeros(100), scores)


def test_at_threshold_counts_by_hand():
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.4, 0.6, 0.1, 0.5, 0.5]
    # at 0.5, flagged: 0, 2, 4, 5; tp 0 and 4, fp 2 and 5, fn 1, tn 3
    got = at_threshold(labels, scores, 0.5)
    assert {k: got[k] for k in ("tp", "fp", "tn", "fn")} == {"tp": 2, "fp": 2, "tn": 1, "fn": 1}
    assert (got["precision"], got["recall"]) == pytest.approx((0.5, 2 / 3))
    assert got["f1"] == pytest.approx(4 / 7)
    nothing = at_threshold(labels, scores, 1.0)
    assert (nothing["precision"], nothing["recall"], nothing["f1"], nothing["tp"], nothing["fn"]) == (0, 0, 0, 0, 3)


def test_quantile_threshold_equals_numpy():
    normal = np.random.default_rng(4).normal(size=101)
    assert threshold("quantile:0.99", normal) == np.quantile(normal, 0.99)
    assert threshold("quantile:1", normal) == normal.max()


def share_flagged(normal, t):
    return np.mean(normal >= t)


@pytest.mark.parametrize("x", [0.0, 0.1, 0.25, 0.29, 0.5, 0.99])
def test_fpr_threshold_is_the_smallest_keeping_the_rate(x):
    normal = np.random.default_rng(5).integers(0, 30, size=100).astype(np.float64)  # ties
    t = threshold(f"fpr:{x}", normal)
    assert share_flagged(normal, t) <= x
    assert share_flagged(normal, normal[normal < t].max()) > x  # down to the next lower normal score: too many


@pytest.mark.parametrize("x", [0.07, 0.29, 0.57])
def test_fpr_threshold_allows_exactly_floor_x_n(x):
    normal = np.arange(100.0)  # distinct: exactly round(100 x) may be flagged, though 100 * 0.29 < 29 in floats
    assert np.sum(normal >= threshold(f"fpr:{x}", normal)) == round(100 * x)


def test_fpr_threshold_edges():
    normal = np.array([5.0, 5.0, 5.0, 1.0])
    t = threshold("fpr:0.5", normal)  # 2 allowed, but the three 5s go together: none may be flagged
    assert 5.0 < t < 5.0 + 1e-12 and share_flagged(normal, t) == 0
    assert threshold("fpr:0.75", normal) == np.nextafter(1.0, np.inf)  # the three 5s are 0.75: allowed
    assert threshold("fpr:1", normal) == 1.0  # everything may be flagged: the lowest score
    assert threshold("fpr:0", normal) == np.nextafter(5.0, np.inf)
    narrow = np.array([1.0, 2.0, 3.0], dtype=np.float32)  # compared in float32, the threshold stays above 3
    assert share_flagged(narrow, threshold("fpr:0", narrow)) == 0


def test_fixed_and_f1_max_thresholds():
    assert threshold(0.7, None) == 0.7
    assert threshold("0.25", None) == 0.25
    assert threshold("1e-3", None) == 0.001
    labels, scores = [0, 0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8, 0.2]
    assert threshold("f1_max", [0.1], scores, labels) == f1_max(labels, scores)[1] == 0.35
    with pytest.raises(GenlabError, match="no labelled anomalies.*quantile:0.99 or fpr:0.01"):
        threshold("f1_max", [0.1, 0.2], scores=[0.1, 0.2], labels=[0, 0])
    with pytest.raises(GenlabError, match="no labelled anomalies"):
        threshold("f1_max", [0.1, 0.2])
    with pytest.raises(GenlabError, match="needs the scores of normal images"):
        threshold("fpr:0.1", [])


@pytest.mark.parametrize("rule", ["median", "", "quantile:", "quantile:0", "quantile:1.5", "fpr:-0.1", "fpr:2",
                                  "fpr:abc", "nan", "inf", float("nan"), True, None, "f1-max", "top:5"])
def test_bad_rules_raise(rule):
    with pytest.raises(GenlabError, match='"f1_max", "quantile:Q"'):
        parse_rule(rule)
    with pytest.raises(GenlabError):
        threshold(rule, [0.1, 0.2])


def test_parse_rule_kinds():
    assert parse_rule("f1_max") == ("f1_max", None)
    assert parse_rule(" quantile:0.99 ") == ("quantile", 0.99)
    assert parse_rule("fpr:0.01") == ("fpr", 0.01)
    assert parse_rule("0.5") == ("fixed", 0.5)
    assert parse_rule(2) == ("fixed", 2.0)
