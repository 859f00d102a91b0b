"""genlab export (issue 36): each family's export against its checkpoint, damaged exports, the model card."""

import json

import pytest
import torch

from genlab import api, bundle
from genlab.errors import GenlabError
from genlab.export import run as export_run
from genlab.graphs import run_saved
from genlab.parts import load_model
from genlab.scores import score_for
from genlab.scoring import calibrate

from conftest import genlab, make_trainer

TINY = ["dataset=synthetic", "dataset.n=64", "trainer.batch_size=32", "trainer.max_steps=2"]
# each family, small; what its graphs cannot hold (None: a generator and a scorer, both exported)
FAMILIES = {
    "gan": (["model=gan"], set()),
    "gan_ema": (["model=gan", "trainer.ema.decay=0.9"], set()),  # the moving average is what is exported
    "cgan": (["model=cgan", "model.generator.width=8", "model.discriminator.width=8"], set()),
    "vae": (["model=vae", "model.encoder.width=8"], set()),
    "vae_gan": (["model=vae_gan", "model.encoder.width=8", "model.discriminator.width=8"], set()),
    "ddpm": (["model=ddpm", "model.unet.width=8", "dataset.image_size=16"], {"anomaly scorer (denoise)"}),
    "flow": (["model=flow", "model.unet.width=8", "dataset.image_size=16", "model.num_classes=10"],
             {"anomaly scorer (denoise)"}),
    "edm": (["model=edm", "model.unet.width=8", "dataset.image_size=16"], {"anomaly scorer (denoise)"}),
    "draem": (["model=draem", "dataset.image_size=16", "model.reconstructive.width=8", "model.discriminative.width=8"],
              set()),
    "stylegan": (["model=stylegan", "dataset.image_size=16", "model.generator.width=8", "model.generator.max_width=8",
                  "model.discriminator.width=8", "model.discriminator.max_width=8"],
                 {"generator and the anomaly scorer"}),
}
SLOW_ONNX = {"edm", "cgan", "vae_gan", "gan_ema", "draem"}  # CI time: their TorchScript runs, and ONNX for the rest


def export(run, form, out, *extra):
    cfg = api.compose("export", [f"ckpt={run}", f"format={form}", f"out={out}", *extra])
    return export_run(cfg, out.parent / f"{out.name}_log")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")

    def train(family):
        run = root / family
        if not run.exists():
            make_trainer([*FAMILIES[family][0], *TINY], run).fit()
        return run
    return train


PARAMS = [pytest.param(f, form, marks=[pytest.mark.slow] if form == "onnx" and f in SLOW_ONNX else [])
          for f in FAMILIES for form in ("torchscript", "onnx")]


@pytest.mark.parametrize("family,form", PARAMS)
def test_an_export_computes_what_its_checkpoint_computes(family, form, trained, tmp_path):
    """The graphs give the checkpoint's images for fixed noise and its scores for fixed images within 1e-5 (fp32),
    at a batch size other than the one traced; the safetensors weights are the checkpoint's, bit for bit."""
    run = trained(family)
    out = tmp_path / "export"
    export(run, form, out, *(["steps=1"] if family in ("ddpm", "flow", "edm") else []))
    manifest = bundle.verify(out)
    assert set(manifest["not_exported"]) == FAMILIES[family][1]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], bundle.MANIFEST])  # each file checked
    model, cfg, state = load_model(run)
    assert manifest["weights"] == state["weights"] == ("ema" if family == "gan_ema" else "raw")
    again = api.load(out, device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    settings = manifest["sampling"]
    written = {g["file"]: g for g in manifest["graphs"]}
    suffix = ".pt" if form == "torchscript" else ".onnx"
    if model.generates and "generator and the anomaly scorer" not in manifest["not_exported"]:
        z = model.latent(5, torch.Generator().manual_seed(7))
        labels = torch.tensor([3, 1, 4, 1, 5]) if model.num_classes else None
        inputs = (z,) if labels is None else (z, labels)
        with torch.no_grad():
            want = model.generate(z, labels, **settings).float()
        got = run_saved(out / f"generator{suffix}", form, inputs, written[f"generator{suffix}"]["inputs"])
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    if f"scorer{suffix}" in written:
        x = torch.rand(5, *model_shape(cfg), generator=torch.Generator().manual_seed(8))
        score = score_for(model, None)
        calibrate(score, model, cfg, cfg.dataset.get("classes"), torch.device("cpu"))
        with torch.no_grad():
            want = score(model, x).float()
        got = run_saved(out / f"scorer{suffix}", form, (x,), ["images"])
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
        assert want.std() > 0  # five different images, five different scores: the comparison can fail


def model_shape(cfg):
    return tuple(int(cfg.dataset.get(k)) for k in ("channels", "image_size", "image_size"))


def test_a_damaged_export_is_one_clear_line(trained, tmp_path):
    out = tmp_path / "export"
    export(trained("gan"), "torchscript", out)
    r = genlab("sample", f"ckpt={out}", "n=4", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # whole, it samples as a run does
    weights = bytearray((out / bundle.WEIGHTS).read_bytes())
    weights[-10] ^= 0xFF  # a byte of a weight: safetensors alone would read it as another number
    (out / bundle.WEIGHTS).write_bytes(bytes(weights))
    r = genlab("sample", f"ckpt={out}", "n=4", f"hydra.run.dir={tmp_path / 's2'}", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is damaged: model.safetensors no longer matches the checksum" in r.stderr
    (out / "generator.pt").write_bytes((out / "generator.pt").read_bytes()[:100])  # cut short
    (out / bundle.WEIGHTS).write_bytes(bytes(weights[:-10] + bytearray([weights[-10] ^ 0xFF]) + weights[-9:]))
    with pytest.raises(GenlabError, match="generator.pt no longer matches"):
        bundle.verify(out)
    (out / "generator.pt").unlink()
    with pytest.raises(GenlabError, match="is missing generator.pt"):
        api.load(out)
    with pytest.raises(GenlabError, match="already holds an export"):
        export(trained("gan"), "safetensors", out)


def test_onnx_without_its_extra_names_the_extra(trained, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(GenlabError, match=r"onnxruntime is not installed: pip install 'genlab\[export\]'"):
        export(trained("gan"), "onnx", tmp_path / "export")
    with pytest.raises(GenlabError, match="format=keras is not one of safetensors, torchscript, onnx"):
        export(trained("gan"), "keras", tmp_path / "export")


def test_the_model_card_names_the_runs_metrics_and_command(tmp_path):
    """A one-class VAE trained and evaluated as a user would: its card quotes the command, the AUROC genlab evaluate
    measured, the data's licence and the environment; an inspection-free run has no threshold to carry."""
    command = ["model=vae", "dataset.classes=[0]", "trainer.max_steps=30", "trainer.n_samples=16",
               "model.encoder.width=8"]
    r = genlab("train", *command, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", f"ckpt={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    auroc = json.loads((tmp_path / "eval" / "report.json").read_text())["auroc"]
    r = genlab("export", f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'card'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "card" / "README.md").read_text()
    assert f"`genlab train {' '.join(command)}`" in card
    assert f"AUROC {auroc:.4f}" in card and "30 steps" in card
    assert "licensed CC BY 4.0 by the UCI Machine Learning Repository" in card  # the digits' licence line
    assert f"torch {torch.__version__}" in card and "![64 samples" in card
    assert (tmp_path / "card" / "samples.png").is_file() and not (tmp_path / "card" / "threshold.json").exists()
    manifest = json.loads((tmp_path / "card" / bundle.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.yaml", "samples.png", "README.md"}
    r = genlab("evaluate", f"ckpt={tmp_path / 'card'}", f"hydra.run.dir={tmp_path / 'eval2'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # the export evaluates as its run does, to the same AUROC
    report = json.loads((tmp_path / "eval2" / "report.json").read_text())
    assert report["auroc"] == pytest.approx(auroc, abs=1e-6) and report["overrides"] == command  # the run's command
    bundle.verify(tmp_path / "card")  # and is left as it was exported
    assert not (tmp_path / "card" / "evaluations.json").exists()
    r = genlab("train", f"resume={tmp_path / 'card'}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert r.returncode == 1 and "is an export, which holds weights only" in r.stderr and "Traceback" not in r.stderr
