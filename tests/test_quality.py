"""The quality metrics: pure-function properties, the FID noise ladder, the real command, and the
standard Inception FID from a weights file with the real keys and shapes but random values."""

import csv
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
import torchvision
from PIL import Image

from genlab import metrics
from genlab.classifier import NoClassifier, classifier_for, predict
from genlab.data import digits, mnist
from genlab.errors import GenlabError
from genlab.inception import inception_features, load_inception

from conftest import SHARED_DATA, compose_train, genlab, genlab_here


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


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
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
    r = genlab_here("train", "model=gan", "trainer.max_steps=30", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", "task=quality", f"ckpt={tmp_path / 'run'}", "n_samples=500", f"hydra.run.dir={tmp_path / 'q'}",
               cwd=tmp_path)  # the digits classifier: from the session's cache, where the test above trained it
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    for k in ("fid", "kid", "precision", "recall", "inception_score", "classes_covered", "class_histogram", "protocol"):
        assert k in rep
    assert sum(rep["class_histogram"]) == 500 and rep["protocol"]["n_samples"] == 500
    assert 0 <= rep["precision"] <= 1 and rep["fid"] > 0
    assert (tmp_path / "q" / "classes.png").is_file() and (tmp_path / "q" / "report.md").is_file()


def test_quality_needs_a_dataset_that_can_train_its_classifier(tmp_path):
    """A folder of faces with no sub-folders has one class: a classifier trained on it learns nothing (its loss
    is 0 from the start), and an FID in its features would be that of a random network. Refused, and so is a
    training split too small to train one."""
    from PIL import Image

    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(40):
        Image.new("RGB", (20, 20), (6 * i, 100, 200 - 5 * i)).save(faces / f"{i}.png")
    cfg = compose_train(["dataset=folder", f"dataset.root={faces}", "dataset.image_size=16"])
    with pytest.raises(NoClassifier, match="has a single class"):
        classifier_for(cfg.dataset, "cpu")
    with pytest.raises(NoClassifier, match="too small to train one: 200 images, the fewest of a class [0-9]+ "):
        classifier_for(compose_train(["dataset=synthetic", "dataset.n=200"]).dataset, "cpu")
    # through the command: one clear line that says what would work
    r = genlab("train", "model=gan", "dataset=folder", f"dataset.root={faces}", "dataset.image_size=16",
               "trainer.max_steps=1", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", "task=quality", f"ckpt={tmp_path / 'run'}", "n_samples=100", cwd=tmp_path)
    assert r.returncode == 1 and "has a single class" in r.stderr and "inception_weights=PATH" in r.stderr
    assert "Traceback" not in r.stderr


def test_processes_that_want_one_yardstick_at_once_train_it_once(monkeypatch, tmp_path):
    """Two at once (sweep jobs, ranks, test workers): the second waits on the first's lock and reads its cache."""
    import threading

    from genlab import classifier

    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path))
    fits, fit = [], classifier.fit_classifier
    monkeypatch.setattr(classifier, "fit_classifier", lambda *a: fits.append(1) or fit(*a))
    node = compose_train(["dataset=synthetic", "dataset.n=1000", "dataset.image_size=8"]).dataset
    got = []
    threads = [threading.Thread(target=lambda: got.append(classifier_for(node, "cpu", epochs=1, width=4, min_steps=30)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fits) == 1 and len(got) == 2
    assert all(torch.equal(a, b) for a, b in zip(got[0][0].state_dict().values(), got[1][0].state_dict().values()))


def test_one_yardstick_everywhere(monkeypatch, caplog, tmp_path):
    """genlab's FID classifier trains in fp32 whatever the device computes natively (this CPU runs bf16, an older
    GPU fp16), its cache is keyed by the device type that trained it, and a damaged cache is trained again."""
    from genlab.nets.classifier import SmallCNN

    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path))  # its own: the session's classifiers are shared
    autocast_seen = []
    forward = SmallCNN.forward
    monkeypatch.setattr(SmallCNN, "forward", lambda self, x: autocast_seen.append(torch.is_autocast_enabled("cpu"))
                        or forward(self, x))
    node = compose_train(["dataset=synthetic", "dataset.n=1000", "dataset.image_size=8"]).dataset
    net, info = classifier_for(node, "cpu", epochs=1, width=4, min_steps=4)
    assert autocast_seen and not any(autocast_seen)
    cached = list((Path(os.environ["GENLAB_CACHE"]) / "classifiers").glob("synthetic-*.pt"))
    assert len(cached) == 1
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        again, _ = classifier_for(node, "cpu", epochs=1, width=4, min_steps=4)
    assert "unreadable classifier cache" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_the_yardstick_is_keyed_by_where_the_data_lies_not_how_it_was_spelt(monkeypatch, tmp_path):
    """dataset.root=data and dataset.root=/abs/data (the same folder) find one cached classifier; another folder
    has its own."""
    from genlab import classifier

    monkeypatch.chdir(tmp_path)
    looked_up = []
    monkeypatch.setattr(classifier, "cached_classifier", lambda path, device: looked_up.append(path) or ("net", {}))
    for root in ("data", str(tmp_path / "data"), "./data/../data", "other"):
        classifier_for(compose_train(["dataset=mnist", f"dataset.root={root}"]).dataset, "cpu")
    assert len(set(looked_up[:3])) == 1 and looked_up[3] != looked_up[0]


def test_flip_and_shift_moves_whole_images():
    """Each augmented image is its original, mirrored or not, shifted by at most ``pad`` pixels with the border
    reflected in: one of the 2 x 5 x 5 candidates, and not always the same one."""
    from genlab.classifier import flip_and_shift

    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 8, 8, generator=g)
    out = flip_and_shift(x, g, pad=2)
    picked = set()
    for img, orig in zip(out, x):
        candidates = [(f, dy, dx) for f in (0, 1) for dy in range(5) for dx in range(5)
                      if torch.equal(img, torch.nn.functional.pad((orig.flip(2) if f else orig)[None], (2, 2, 2, 2),
                                                                  mode="reflect")[0, :, dy:dy + 8, dx:dx + 8])]
        assert candidates, "an augmented image is no flip and shift of its original"
        picked.add(candidates[0])
    assert len(picked) > 10 and {f for f, _, _ in picked} == {0, 1}


def test_colour_images_get_the_resnet_yardstick(tmp_path):
    """A colour dataset's classifier is the narrow ResNet-9 (128-d features at width 16), trained with its recipe
    (flips, shifts, SGD) to tell reddish from bluish noise; a grey one keeps the small CNN (its cache key, and so
    its weights, as before)."""
    from PIL import Image

    from genlab.nets.classifier import ResNetClassifier, SmallCNN

    rng = np.random.default_rng(0)
    for name, tint in (("red", (60, 0, 0)), ("blue", (0, 0, 60))):
        (tmp_path / name).mkdir()
        for i in range(90):
            noise = rng.integers(0, 190, (16, 16, 3)) + np.array(tint)
            Image.fromarray(noise.astype(np.uint8)).save(tmp_path / name / f"{i}.png")
    node = compose_train(["dataset=folder", f"dataset.root={tmp_path}", "dataset.image_size=16",
                          "dataset.test_fraction=0.3"]).dataset
    net, info = classifier_for(node, "cpu", epochs=1, min_steps=30)
    assert isinstance(net, ResNetClassifier) and "ResNetClassifier(width=16), 128-d features" == info["architecture"]
    assert info["test_accuracy"] > 0.8, info  # two classes: 0.5 by chance
    feats, probs = predict(net, torch.rand(5, 3, 16, 16), "cpu")
    assert feats.shape == (5, 128) and probs.shape == (5, 2)
    again, _ = classifier_for(node, "cpu", epochs=1, min_steps=30)  # from the cache
    assert isinstance(again, ResNetClassifier)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    grey = compose_train(["dataset=synthetic", "dataset.n=600", "dataset.image_size=8"]).dataset
    assert isinstance(classifier_for(grey, "cpu", epochs=1, width=4, min_steps=4)[0], SmallCNN)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="real CIFAR-10 not in ../shared/data")
def test_the_cifar10_yardstick_is_competent():
    """The measuring stick of CIFAR-10 classifies its test split at 85 % or better (docs/results.md: 7-8 minutes on
    2 CPU cores)."""
    cfg = compose_train(["dataset=cifar10", f"dataset.root={SHARED_DATA}", "dataset.download=false"])
    _, info = classifier_for(cfg.dataset, "cpu")
    assert info["test_accuracy"] >= 0.85, info


def test_sampling_precision_auto_is_what_the_configs_say(monkeypatch):
    """sample.yaml and evaluate.yaml: auto is bf16 where the device computes it natively, else fp32; training's
    auto takes fp16 with a gradient scaler on a GPU without native bf16."""
    from genlab import device as device_module

    monkeypatch.setattr(device_module, "cuda_has_native_bf16", lambda d: False)
    old_gpu = torch.device("cuda", 0)
    assert device_module.resolve_precision("auto", old_gpu, fp16=False) == "fp32"
    assert device_module.resolve_precision("auto", old_gpu) == "fp16"
    monkeypatch.setattr(device_module, "cuda_has_native_bf16", lambda d: True)
    assert device_module.resolve_precision("auto", old_gpu, fp16=False) == "bf16"


@pytest.mark.slow  # the summary and the Inception FID have faster tests of their own
def test_evaluate_quality_of_a_sweep_groups_the_seeds(tmp_path):
    r = genlab("train", "-m", "model=gan", "trainer.max_steps=20", "device=cpu", "optimizer.lr=0.0001,0.001", "seed=0,1",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", "task=quality", f"ckpt={tmp_path / 'sweep'}", "n_samples=300", f"hydra.run.dir={tmp_path / 'q'}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "q" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    runs = rows[:4]
    assert [r["run"] for r in runs] == ["0", "1", "2", "3"]
    for r in runs:
        assert float(r["fid"]) == pytest.approx(json.loads((tmp_path / "q" / r["run"] / "report.json").read_text())["fid"])
    # the mean over all four runs, then over the two seeds of each learning rate
    assert [(r["run"], r["overrides"]) for r in rows[4:]] == [
        ("mean", ""), ("std", ""), ("mean", "optimizer.lr=0.0001"), ("std", "optimizer.lr=0.0001"),
        ("mean", "optimizer.lr=0.001"), ("std", "optimizer.lr=0.001")]
    for setting, i in (("optimizer.lr=0.0001", 6), ("optimizer.lr=0.001", 8)):
        fids = [float(r["fid"]) for r in runs if setting in r["overrides"].split()]
        assert len(fids) == 2 and float(rows[i]["fid"]) == pytest.approx(sum(fids) / 2, rel=1e-5)
    assert "Over the seeds of each setting" in (tmp_path / "q" / "summary.md").read_text()
    assert (tmp_path / "q" / "summary.png").is_file()


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not in ../shared/data")
def test_mnist_classifier_reaches_99_percent():
    cfg = compose_train(["dataset=mnist", f"dataset.root={SHARED_DATA}", "dataset.download=false"])
    net, info = classifier_for(cfg.dataset, "cpu")
    assert info["test_accuracy"] >= 0.99, info
    test = mnist(SHARED_DATA, train=False, download=False)
    _, probs = predict(net, test.images[:2000], "cpu")
    assert float((probs.argmax(1) == test.labels[:2000]).float().mean()) >= 0.985


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not in ../shared/data")
def test_evaluate_a_folder_of_images(tmp_path):
    """(Beside the test above: the MNIST classifier it trains is cached for this one.) The test images of one MNIST
    class written as PNG files and measured as samples against that class of the test split: an FID near 0 (any
    change to the pixels on the way, a flip, a scale, a channel, moves it away); noise: a large one."""
    test = mnist(SHARED_DATA, train=False, download=False, classes=[0])
    for name, images in (("real", test.images),
                         ("noise", torch.randint(0, 256, (500, 1, 28, 28), generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.uint8))):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[0].numpy()).save(tmp_path / name / f"{i:06d}.png")
    fids = {}
    for name in ("real", "noise"):
        r = genlab_here("evaluate", "task=quality", f"samples={tmp_path / name}", "dataset=mnist",
                        f"dataset.root={SHARED_DATA}", "dataset.download=false", "dataset.classes=[0]",
                        f"hydra.run.dir={tmp_path / ('e' + name)}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        report = json.loads((tmp_path / f"e{name}" / "report.json").read_text())
        fids[name] = report["fid"]
    assert report["protocol"]["reference"] == f"mnist test split, {len(test)} images, classes [0]"
    assert fids["real"] < 0.01 and fids["noise"] > 100, fids
    r = genlab("evaluate", "task=quality", f"samples={tmp_path / 'real'}", cwd=tmp_path)
    assert r.returncode == 1 and "dataset=mnist" in r.stderr


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """The FID Inception's keys and shapes (pytorch-fid's layout, torchvision's InceptionV3 with 1008 classes)
    with random values: nothing to download."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # features of order 1, not ~0
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def gan_on_ones(tmp_path_factory):
    """A GAN trained briefly on the digit 1, whose test split (37 images) keeps Inception on a CPU quick."""
    cwd = tmp_path_factory.mktemp("gan1")
    r = genlab_here("train", "model=gan", "dataset.classes=[1]", "trainer.max_steps=20", "device=cpu",
                    f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"


def test_inception_features_follow_the_fid_protocol(inception_weights):
    net, info = load_inception(inception_weights, "cpu")
    x = digits(train=False).images[:8]  # uint8 [8, 1, 28, 28]
    f = inception_features(net, x.float() / 255, "cpu", batch_size=5)  # [0, 1] floats, grayscale, two batches
    with torch.inference_mode():
        (expected,) = net(x.repeat(1, 3, 1, 1))  # what torch-fidelity is given: uint8 RGB
    assert f.shape == (8, 2048) and torch.isfinite(f).all()
    assert torch.allclose(f, expected, rtol=1e-4, atol=1e-5)
    assert f.std(0).mean() > 1e-3  # different images, different features
    assert info["sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()[:12]


def test_inception_weights_that_do_not_fit(tmp_path, inception_weights, monkeypatch):
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "keys.pth")
    with pytest.raises(GenlabError, match="does not fit InceptionV3.*pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "keys.pth", "cpu")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(GenlabError, match="holds a Tensor, not a state dict"):
        load_inception(tmp_path / "tensor.pth", "cpu")
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)  # as if not installed
    with pytest.raises(GenlabError, match=r"pip install 'genlab\[inception\]'"):
        load_inception(inception_weights, "cpu")


@pytest.mark.slow  # the summary and the Inception FID have faster tests of their own
def test_inception_fid_through_the_command(gan_on_ones, inception_weights, tmp_path):
    r = genlab("evaluate", "task=quality", f"ckpt={gan_on_ones}", "n_samples=16",
               f"inception_weights={inception_weights}", f"hydra.run.dir={tmp_path / 'q'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert math.isfinite(rep["fid_inception"]) and rep["fid_inception"] > 0
    assert rep["fid"] > 0 and rep["protocol"]["n_samples"] == 16  # the classifier's metrics are still there
    assert rep["protocol"]["reference"] == "digits test split, 37 images, classes [1]"
    protocol = rep["protocol"]["fid_inception"]
    assert str(inception_weights.resolve()) in protocol and "2048-d" in protocol
    assert hashlib.sha256(inception_weights.read_bytes()).hexdigest()[:12] in protocol
    assert "| FID (standard Inception, 2048-d) |" in (tmp_path / "q" / "report.md").read_text()


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"not weights\n" * 100, "weights_only=True")])
def test_inception_weights_missing_or_not_weights(gan_on_ones, tmp_path, content, message):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    if content is not None:
        path.write_bytes(content)
    r = genlab("evaluate", "task=quality", f"ckpt={gan_on_ones}", "n_samples=16", f"inception_weights={path}",
               f"hydra.run.dir={tmp_path / 'q'}", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("genlab evaluate: error: inception_weights=") and message in last
    assert str(path.resolve()) in last and "pt_inception-2015-12-05-6726825d.pth" in last
    assert not (tmp_path / "q" / "report.json").exists()
