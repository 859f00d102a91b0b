"""Hyperparameter search: the in-loop measurements a search optimizes (genlab.search)."""

import csv

import pytest
import torch

from genlab.build import test_split as split_of
from genlab.errors import GenlabError

from conftest import compose_train, make_trainer

# small VAE trials on the offline default data (digits): 4 steps an epoch
TRIAL = ["model=vae", "model.encoder.width=8", "model.encoder.latent_dim=4", "dataset.classes=[0,1]",
         "trainer.batch_size=64", "trainer.progress=false", "trainer.precision=fp32", "trainer.n_samples=4",
         "trainer.keep_every=0", "device=cpu"]


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_measurements_join_the_rows_and_leave_training_as_it_was(tmp_path):
    """val/loss after each epoch in the rows and metrics.csv, equal to the VAE's mean negative ELBO on the test
    split; the same weights as a run that measures nothing."""
    small = ["model=vae", "model.encoder.width=8", "dataset=synthetic", "dataset.n=64", "trainer.batch_size=32",
             "trainer.epochs=2", "trainer.n_samples=4"]
    measured = make_trainer([*small, "evaluation.metrics=[val/loss]"], tmp_path / "a")
    measured.fit()
    plain = make_trainer(small, tmp_path / "b")
    plain.fit()
    assert [r["epoch"] for r in measured.history if "val/loss" in r] == [1, 2]
    assert all("val/loss" not in r for r in plain.history)
    for a, b in zip(measured.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)
    test = split_of(compose_train(small)).images
    with torch.inference_mode():
        expected = measured.model.eval().anomaly_score(test.float().div(255), "elbo").mean()
    assert measured.history[-1]["val/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert [float(r["val/loss"]) for r in rows(tmp_path / "a" / "metrics.csv")] == pytest.approx(
        [r["val/loss"] for r in measured.history])


def test_fid_and_auroc_in_the_loop(tmp_path, monkeypatch):
    """eval/fid and eval/kid: the samples against the test split in a classifier's features (here an untrained
    one: genlab's own takes a minute to train); eval/auroc on one class."""
    from genlab import classifier, metrics
    from genlab.nets.classifier import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(channels=1, image_size=28, n_classes=10, width=4).eval()
    monkeypatch.setattr(classifier, "classifier_for", lambda dataset, device: (net, {}))
    gan = make_trainer(["model=dcgan", "trainer.max_steps=2", "trainer.batch_size=16", "trainer.n_samples=4",
                        "evaluation.metrics=[eval/fid]", "evaluation.n_samples=64"], tmp_path / "g")
    gan.fit()
    real = classifier.predict(net, split_of(compose_train(["model=dcgan"])).images, "cpu")[0]
    fake = classifier.predict(net, gan.model.eval().sample(64, generator=torch.Generator().manual_seed(0)), "cpu")[0]
    assert gan.history[-1]["eval/fid"] == pytest.approx(metrics.fid(real, fake), rel=1e-4)
    assert gan.history[-1]["eval/kid"] == pytest.approx(metrics.kid(real, fake)[0], rel=1e-4)
    vae = make_trainer([*TRIAL[:3], "dataset.classes=[0]", "trainer.max_steps=2", "trainer.batch_size=16",
                        "evaluation.metrics=[eval/auroc]"], tmp_path / "v")
    vae.fit()
    assert 0 <= vae.history[-1]["eval/auroc"] <= 1


@pytest.mark.parametrize("overrides,message", [
    (["evaluation.metrics=[val/nope]"], "val/nope is not a metric genlab measures"),
    (["evaluation.metrics=[val/loss]"], "GAN has none"),
    (["model=vae", "evaluation.metrics=[eval/auroc]"], "trained on every class"),
    (["model=vae", "evaluation.metrics=[val/loss]", "evaluation.every=0"], "evaluation.every must be"),
])
def test_measurements_that_cannot_be_made_are_refused(tmp_path, overrides, message):
    with pytest.raises(GenlabError, match=message):
        make_trainer(["dataset=synthetic", "dataset.n=64", *overrides], tmp_path)
