"""train -> sample -> evaluate through the real command, on the offline default dataset."""

import csv
import json

import pytest
import torch

from genlab import checkpoint, evaluate

from conftest import genlab, genlab_here

VAE_ON_ZERO = ["model=vae", "dataset.classes=[0]", "trainer.batch_size=32", "trainer.max_steps=150",
               "trainer.log_every=50", "trainer.n_samples=16", "device=cpu", "trainer.precision=fp32",
               "optimizer.lr=1e-3"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("rt")
    r = genlab_here("train", *VAE_ON_ZERO, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"


def test_sample_writes_every_picture(vae_run, tmp_path):
    out = tmp_path / "s"
    r = genlab("sample", f"ckpt={vae_run}", "n=16", "seed=3", "n_latent=200", f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for f in ("grid.png", "interpolation.png", "reconstructions.png", "latent.png", "traversal.png", "samples.pt"):
        assert (out / f).is_file(), f
    x = torch.load(out / "samples.pt", weights_only=True)
    assert x.shape == (16, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    again = tmp_path / "s2"
    genlab_here("sample", f"ckpt={vae_run / 'checkpoints' / 'last.pt'}", "n=16", "seed=3", "n_latent=200",
                f"hydra.run.dir={again}", cwd=tmp_path)
    assert torch.equal(x, torch.load(again / "samples.pt", weights_only=True))  # same seed, same samples


@pytest.mark.parametrize("score", [None, "blur_kl", "elbo", "recon", "mse", "mse_blur"])
def test_evaluate_scores_the_trained_digit_lowest(vae_run, tmp_path, score):
    """Each VAE score; None: the default, corrected, the best on MNIST, Fashion-MNIST and CIFAR-10 (docs/results.md)."""
    out = tmp_path / "e"
    r = genlab_here("evaluate", f"ckpt={vae_run}", *([f"score={score}"] if score else []), f"hydra.run.dir={out}",
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["auroc"] <= 1.0 and report["score"] == (score or "corrected")
    assert report["normal_classes"] == [0] and report["n_normal"] + report["n_anomalous"] == 360
    assert report["step"] == 150
    means = {int(c): v["mean_score"] for c, v in report["per_class"].items()}
    assert means[0] < min(v for c, v in means.items() if c != 0)
    assert report["auroc"] > 0.8
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 360 and set(rows[0]) == {"index", "label", "anomalous", "score"}
    assert (out / "roc.png").is_file() and "AUROC" in (out / "report.md").read_text()


def test_evaluate_a_gan_by_its_critic(tmp_path):
    r = genlab_here("train", "model=gan", "dataset.classes=[1]", "trainer.max_steps=20", "device=cpu",
                    f"hydra.run.dir={tmp_path / 'gan'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", f"ckpt={tmp_path / 'gan'}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e" / "report.json").read_text())["score"] == "critic"


def test_evaluate_a_whole_sweep(tmp_path):
    r = genlab("train", "-m", *VAE_ON_ZERO[:2], "dataset.classes=[0],[1]", *VAE_ON_ZERO[2:],
               "trainer.max_steps=20", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", f"ckpt={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "e" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["0", "1", "mean", "std"]
    assert rows[0]["overrides"].count("dataset.classes=[0]") == 1 and rows[1]["normal_classes"] == "1"
    aurocs = [float(r["auroc"]) for r in rows[:2]]
    assert float(rows[2]["auroc"]) == pytest.approx(sum(aurocs) / 2, abs=1e-5)
    assert (tmp_path / "e" / "0" / "roc.png").is_file()
    assert (tmp_path / "e" / "summary.md").is_file() and (tmp_path / "e" / "summary.png").is_file()


def test_sweep_summary_statistics(tmp_path):
    def report(run, auroc, *overrides):
        return {"task": "anomaly", "model": "VAE", "dataset": "digits", "score": "elbo", "normal_classes": [0],
                "auroc": auroc, "auprc": auroc, "overrides": list(overrides), "checkpoint": f"/s/{run}/checkpoints/last.pt"}

    rows = [report(0, 0.6, "lr=1", "seed=0"), report(1, 0.8, "lr=1", "seed=1"), report(2, 0.9, "lr=2", "seed=0")]
    evaluate.write_summary(rows, tmp_path)
    with open(tmp_path / "summary.csv") as fh:
        summary = [(r["run"], r["overrides"], r["runs"], r["auroc"]) for r in csv.DictReader(fh)][3:]
    assert summary == [
        ("mean", "", "3", "0.766667"), ("std", "", "3", "0.152753"),  # the sample (n - 1) standard deviation
        ("mean", "lr=1", "2", "0.700000"), ("std", "lr=1", "2", "0.141421"),
        ("mean", "lr=2", "1", "0.900000"), ("std", "lr=2", "1", ""),  # one run: no spread to give
    ]
    md = (tmp_path / "summary.md").read_text()
    assert "| lr=1 | 2 | 0.7000 ± 0.1414 | 0.7000 ± 0.1414 |" in md and "| lr=2 | 1 | 0.9000 | 0.9000 |" in md
    # a setting with no overrides of its own is named, not left blank like the row over all runs
    evaluate.write_summary([report(0, 0.5, "seed=0"), report(1, 0.7, "seed=1"), report(2, 0.9, "+x=1", "seed=0")],
                           tmp_path)
    with open(tmp_path / "summary.csv") as fh:
        assert [r["overrides"] for r in csv.DictReader(fh)][5:] == ["(none)", "(none)", "+x=1", "+x=1"]


@pytest.mark.parametrize("args,message", [
    (["normal_classes=[42]"], "names no test image"),
    (["normal_classes=[0,1,2,3,4,5,6,7,8,9]"], "nothing is anomalous"),
    (["score=critic"], "score=critic is not offered"),
    (["normal_classes=[one]"], "could not be converted to Integer"),
    (["n_samples=1.5"], "could not be converted to Integer"),
    (["+no_such_key=1"], "no_such_key is not a setting of genlab evaluate nor a sampling setting of VAE"),
])
def test_evaluate_bad_input(vae_run, tmp_path, args, message):
    r = genlab_here("evaluate", f"ckpt={vae_run}", *args, cwd=tmp_path)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_damaged_checkpoints_are_one_clear_line(vae_run, tmp_path):
    good = (vae_run / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    state = checkpoint.load(vae_run)
    checkpoint.save({**state, "version": checkpoint.VERSION + 1}, tmp_path / "newer.pt")
    (tmp_path / "notes.pt").write_text("hello")
    cases = {"cut.pt": "truncated or damaged", "newer.pt": "Upgrade genlab", "notes.pt": "cannot be read",
             "missing.pt": "checkpoint not found"}
    for name, message in cases.items():
        r = genlab_here("sample", f"ckpt={tmp_path / name}", cwd=tmp_path)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
