"""The quality metrics: pure-function properties, the FID noise ladder, and the real command."""

import json

import pytest
import torch

from genlab import metrics
from genlab.classifier import classifier_for, predict
from genlab.data import digits, mnist

from conftest import SHARED_DATA, compose_train, genlab


def test_fid_of_identical_sets_is_zero_and_grows_with_shift():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.fid(x, x) == pytest.approx(0, abs=1e-6)
    shifts = [metrics.fid(x, x + d) for d in (0.1, 0.5, 1.0)]
    assert shifts == sorted(shifts) and shifts[0] == pytest.approx(16 * 0.01, rel=1e-3)  # ||mu1 - mu2||^2


def test_precision_recall_and_coverage_see_mode_collapse():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 8, generator=g)
    collapsed = real[:50].repeat(20, 1) + 0.01 * torch.randn(1000, 8, generator=g)
    p, r = metrics.precision_recall(real, collapsed)
    p2, r2 = metrics.precision_recall(real, torch.randn(1000, 8, generator=g))
    assert p > 0.9 and r < 0.3 and r2 > 0.6
    one_hot = torch.eye(10)[torch.tensor([3] * 95 + [4] * 5)]
    assert metrics.class_coverage(one_hot) == (2, [0, 0, 0, 95, 5, 0, 0, 0, 0, 0])
    assert metrics.inception_score(torch.eye(10).repeat(100, 1), splits=1)[0] == pytest.approx(10, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 8, generator=g), torch.randn(1500, 8, generator=g)
    assert abs(metrics.kid(a, b)[0]) < 0.01 < metrics.kid(a, b + 1)[0]


def test_fid_rises_monotonically_with_noise_on_real_images():
    cfg = compose_train(["dataset=digits"])
    net, info = classifier_for(cfg.dataset, "cpu")
    assert info["test_accuracy"] > 0.9
    train_f, _ = predict(net, digits(train=True).images, "cpu")
    test = digits(train=False).images.float() / 255
    g = torch.Generator().manual_seed(0)
    fids = [metrics.fid(train_f, predict(net, (test + s * torch.randn(test.shape, generator=g)).clamp(0, 1), "cpu")[0])
            for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert fids == sorted(fids), fids
    assert fids[0] < 0.1 * fids[-1]


def test_evaluate_quality_through_the_command(tmp_path):
    r = genlab("train", "model=gan", "trainer.max_steps=30", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", "task=quality", f"ckpt={tmp_path / 'run'}", "n_samples=500", f"hydra.run.dir={tmp_path / 'q'}",
               cwd=tmp_path, env={"GENLAB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    for k in ("fid", "kid", "precision", "recall", "inception_score", "classes_covered", "class_histogram", "protocol"):
        assert k in rep
    assert sum(rep["class_histogram"]) == 500 and rep["protocol"]["n_samples"] == 500
    assert 0 <= rep["precision"] <= 1 and rep["fid"] > 0
    assert (tmp_path / "q" / "classes.png").is_file() and (tmp_path / "q" / "report.md").is_file()


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not in ../shared/data")
def test_mnist_classifier_reaches_99_percent():
    cfg = compose_train(["dataset=mnist", f"dataset.root={SHARED_DATA}", "dataset.download=false"])
    net, info = classifier_for(cfg.dataset, "cpu")
    assert info["test_accuracy"] >= 0.99, info
    test = mnist(SHARED_DATA, train=False, download=False)
    _, probs = predict(net, test.images[:2000], "cpu")
    assert float((probs.argmax(1) == test.labels[:2000]).float().mean()) >= 0.985
