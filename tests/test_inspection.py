"""Inspection runs (dataset=mvtec) through the real commands: genlab evaluate's image and pixel metrics, threshold
and overlays; genlab predict on a folder of new images, with an unreadable file among them."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from genlab import inspection, predict
from genlab.report import write as write_page
from genlab.scores import score_for
from genlab import parts
from genlab.parts import load_model

from conftest import genlab_here
from test_mvtec import layout

TRAIN = ["model=vae", "dataset=mvtec", "dataset.image_size=16", "dataset.val_fraction=0.3", "trainer.batch_size=8",
         "trainer.epochs=3", "device=cpu", "trainer.progress=false", "trainer.precision=fp32", "trainer.keep_every=0"]


@pytest.fixture(scope="module")
def inspection_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("insp")
    data = layout(cwd / "data", n_train=24)
    r = genlab_here("train", *TRAIN, f"dataset.root={data}", f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run", data


def test_evaluate_reports_image_and_pixel_metrics_and_stores_the_threshold(inspection_run, tmp_path):
    run, _ = inspection_run
    out = tmp_path / "e"
    r = genlab_here("evaluate", f"ckpt={run}", "score=mse_blur", "threshold=fpr:0.0", "map_sigma=1",
                    f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "inspection" and report["n_normal"] == 2 and report["n_anomalous"] == 4
    assert set(report["per_defect"]) == {"crack", "hole"} and report["per_defect"]["crack"]["n"] == 2
    for key in ("auroc", "auprc", "f1_max", "pixel_auroc", "aupro"):
        assert 0 <= report[key] <= 1, key
    assert "pixel_auroc" in report["per_defect"]["hole"]  # one of its two images has a mask
    t = report["threshold"]
    assert t["rule"] == "fpr:0.0" and t["tp"] + t["fn"] == 4 and t["fp"] + t["tn"] == 2
    stored = inspection.stored_threshold(run)
    assert stored["value"] == t["value"] and stored["score"] == "mse_blur" and stored["map_sigma"] == 1
    # fpr:0 flags no validation image: the threshold is above every validation score
    model, cfg, _ = load_model(run)
    val = parts.test_split(cfg, validation=True)
    from genlab.scoring import maps_of

    s, _ = maps_of(model, val.images, score_for(model, "mse_blur"), 64, "cpu", None)
    assert (s < t["value"]).all() and len(s) == report["n_validation"]
    for f in ("roc.png", "overlays_good_highest.png", "overlays_defect_highest.png", "overlays_defect_lowest.png"):
        assert (out / f).is_file(), f
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows][:2] == ["test/good/000.png", "test/good/001.jpg"]
    assert {r["decision"] for r in rows} <= {"good", "defective"}
    assert "pixel AUROC" in (out / "report.md").read_text()
    page = write_page([run], tmp_path / "page.html").read_text()  # genlab report shows the tables and overlays
    assert "pixel AUROC" in page and 'alt="defects scored highest"' in page and "good images scored highest" in page


def test_f1_max_needs_labelled_defects_in_validation(inspection_run, tmp_path):
    run, _ = inspection_run
    r = genlab_here("evaluate", f"ckpt={run}", "threshold=f1_max", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert r.returncode == 1 and "quantile:0.99" in r.stderr and "Traceback" not in r.stderr


def test_predict_scores_a_folder_and_names_the_unreadable_file(inspection_run, tmp_path):
    run, data = inspection_run
    images = tmp_path / "new"
    (images / "line2").mkdir(parents=True)
    for i, src in enumerate(sorted((data / "test").rglob("*.png"))[:3]):
        Image.open(src).save(images / ("line2" if i else ".") / f"part{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p"
    r = genlab_here("predict", f"ckpt={run}", f"images={images}", "threshold=0.5", "score=mse_blur",
                    f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    said = (r.stdout + r.stderr).splitlines()
    assert sum("broken.png" in line for line in said) == 1, said
    rows = predict.read_predictions(out / "predictions.csv")
    assert [x["file"] for x in rows] == ["line2/part1.png", "line2/part2.png", "part0.png"]
    assert all(x["threshold"] == 0.5 and x["decision"] == ("defective" if x["score"] >= 0.5 else "good") for x in rows)
    with open(out / "predictions.csv") as fh:  # the CSV round-trips: the scores are written in full
        again = [float(x["score"]) for x in csv.DictReader(fh)]
    model, _, _ = load_model(run)
    x = np.stack([np.asarray(Image.open(images / f["file"]).convert("L").resize((16, 16), Image.Resampling.BICUBIC))
                  for f in rows])
    import torch

    mine = score_for(model, "mse_blur")(model, torch.from_numpy(x).float().div(255).unsqueeze(1))
    assert np.allclose(again, mine.detach().numpy(), rtol=1e-5)
    assert (out / "maps" / "line2" / "part1.png").is_file() and (out / "maps" / "part0.png").is_file()
    for f in ("part0.png", "line2/part1.png"):  # each map over its image at the image's own size
        assert Image.open(out / "maps" / f).size == Image.open(images / f).size


def test_predict_uses_the_stored_threshold_and_refuses_bad_input(inspection_run, tmp_path):
    run, data = inspection_run
    inspection.store_threshold(run, {"score": "mse_blur", "threshold": {"rule": "fixed", "value": 1e9},
                                     "checkpoint": "", "step": 0, "map_sigma": 0})
    out = tmp_path / "p"
    r = genlab_here("predict", f"ckpt={run}", f"images={data / 'test'}", "maps=false", f"hydra.run.dir={out}",
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = predict.read_predictions(out / "predictions.csv")
    assert len(rows) == 6 and all(x["decision"] == "good" and x["threshold"] == 1e9 for x in rows)
    assert not (out / "maps").exists()
    r = genlab_here("predict", f"ckpt={run}", f"images={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'q'}",
                    cwd=tmp_path)
    assert r.returncode == 1 and "is not a directory" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"")
    r = genlab_here("predict", f"ckpt={run}", f"images={empty}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 1 and "could be read" in r.stderr
