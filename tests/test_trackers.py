"""Trackers as callbacks (logger=[tensorboard,mlflow,wandb]) read back with each tool's own reader, a resumed run
continuing the same tracker run with no step twice (from an older checkpoint too: the trackers go on from its step),
a moved run writing its trackers' files where it now is, a callback of your own from a YAML file, the progress GIF,
and a tracker that is not installed as one line."""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import genlab

PLUGINS = Path(__file__).resolve().parent.parent / "examples" / "plugin"
RUN = ["model=gan", "dataset=synthetic", "dataset.n=128", "trainer.batch_size=32", "trainer.log_every=2", "device=cpu",
       "trainer.n_samples=16", "trainer.write_share=1", "trainer.keep_every=2", "trainer.progress=false"]


def rows_of(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def tensorboard_scalars(log_dir: Path, tag: str = ""):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def wandb_records(path: Path):
    """The records of a W&B run file (``run-ID.wandb``): a 7-byte header (":W&B", 0xBEE1, version 0), then
    records in 32 KiB blocks, each as crc32 (4 bytes), length (2) and kind (1: whole, 2 first, 3 middle, 4
    last part), as the LevelDB log that wandb's own (former Python) DataStore reads. wandb 0.31 reads them in
    its Go core only, so the frames are read here and the records by wandb's own protobuf schema."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""
        elif kind == 0:
            break


def wandb_history(run: Path) -> list[dict]:
    """The history rows of every offline W&B run under ``run``, in order."""
    rows = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wandb_timeline(run: Path) -> list[dict]:
    """The history of the offline W&B run under ``run`` as `wandb sync` replays its segments (the offline-run-*
    folders, in the order they were written): a segment whose run record rewinds the run (``resume_from``, a
    branch point in the run itself) first drops the rows past that step."""
    rows = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run" and record.run.branch_point.run == record.run.run_id:
                rows = [row for row in rows if row["_step"] <= record.run.branch_point.value]
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_every_tracker_holds_the_run_and_a_resumed_run_goes_on_in_it(tmp_path):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    env = {"PYTHONPATH": str(PLUGINS), "WANDB_API_KEY": None, "WANDB_MODE": None, "MLFLOW_TRACKING_URI": None,
           "HOME": str(tmp_path)}  # no ~/.netrc: W&B offline
    first, second = tmp_path / "first", tmp_path / "second"
    r = genlab("train", "--config-dir", str(PLUGINS / "configs"), *RUN, "trainer.epochs=4",
               "logger=[tensorboard,mlflow,wandb]", "callbacks=[default,jsonl]", "tags=[baseline]", f"hydra.run.dir={first}",
               cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    rows = rows_of(first)
    steps = [int(row["step"]) for row in rows]

    # TensorBoard: every row's losses at its step, a grid per epoch, the config
    events = tensorboard_scalars(first / "tensorboard", "train/loss_d")
    got = [(e.step, e.value) for e in events.Scalars("train/loss_d")]
    assert got == [(s, pytest.approx(float(row["train/loss_d"]), rel=1e-5)) for s, row in zip(steps, rows)]
    assert len(events.Images("samples")) == 4 and events.Images("samples")[0].width > 16
    assert "config/text_summary" in events.Tags()["tensors"] and "tags/text_summary" in events.Tags()["tensors"]

    # MLflow: the metric history, the params, the images, how it ended
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("genlab").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss_g")
    assert [m.step for m in history] == steps
    assert run.data.params["model._target_"] == "genlab.models.GAN" and run.data.params["optimizer.lr"] == "0.0002"
    assert run.info.status == "FINISHED" and run.data.tags["genlab.status"] == "finished"
    assert run.data.tags["genlab.checkpoint"].endswith("last.pt") and run.data.tags["baseline"] == "true"
    assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))

    # W&B offline: the rows, read back with wandb's own reader
    runs = [r for p in first.glob("wandb/offline-run-*/run-*.wandb") for r in wandb_records(p)]
    assert any(r.WhichOneof("record_type") == "run" and list(r.run.tags) == ["baseline"] for r in runs)
    logged = [h for h in wandb_history(first) if "train/loss_d" in h]
    assert [h["_step"] for h in logged] == steps
    assert logged[-1]["train/loss_d"] == pytest.approx(float(rows[-1]["train/loss_d"]), rel=1e-5)

    # a writer of your own, from a YAML file and a class (callbacks=): the rows and how the run ended
    lines = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines[:-1]] == steps and lines[-1] == {"status": "finished", "step": steps[-1]}

    # the progress GIF: a frame per grid
    with Image.open(first / "samples" / "progress.gif") as gif:
        assert gif.n_frames == 4

    # resumed from the copy kept at epoch 2: the same TensorBoard folder and W&B run, the rows after it not twice;
    # MLflow, which holds steps past it and cannot delete them, goes on in a new run with the history up to it
    r = genlab("train", "--config-dir", str(PLUGINS / "configs"), *RUN, "trainer.epochs=6",
               "logger=[tensorboard,mlflow,wandb]", "callbacks=[default,jsonl]", f"resume={first / 'checkpoints' / 'epoch_0002.pt'}",
               f"hydra.run.dir={second}", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert not (second / "tensorboard").exists()  # the first run's log dir goes on
    resumed_rows = [(int(row["step"]), pytest.approx(float(row["train/loss_g"]), rel=1e-5)) for row in rows_of(second)]
    assert resumed_rows[-1][0] == 6 * steps[-1] // 4
    events = tensorboard_scalars(first / "tensorboard", "train/loss_g")
    assert [(e.step, e.value) for e in events.Scalars("train/loss_g")] == resumed_rows  # steps past 8 purged, again
    tb_steps = [e.step for e in events.Scalars("train/loss_g")]
    runs = client.search_runs([client.get_experiment_by_name("genlab").experiment_id])
    (resumed_run,) = [x for x in runs if x.info.run_id != run.info.run_id]
    assert client.get_run(run.info.run_id).data.tags["genlab.superseded_by"] == resumed_run.info.run_id
    history = sorted(client.get_metric_history(resumed_run.info.run_id, "train/loss_g"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == resumed_rows  # each step once
    assert resumed_run.info.status == "FINISHED" and resumed_run.info.run_name == run.info.run_name
    files = sorted(first.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name  # the same W&B run id, offline twice
    resumed = [h["_step"] for h in wandb_history(first)[len(logged):] if "train/loss_d" in h]
    assert resumed[0] > 2 * steps[-1] // 4 and resumed[-1] == tb_steps[-1]

    # genlab evaluate on the run: its numbers into the same tracker runs, at the checkpoint's step
    r = genlab("evaluate", f"ckpt={second}", "normal_classes=[0,1,2,3,4]", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path,
               env=env)
    assert r.returncode == 0, r.stderr
    auroc = json.loads((tmp_path / "eval" / "report.json").read_text())["auroc"]
    events = tensorboard_scalars(first / "tensorboard", "evaluate/auroc")
    assert [(e.step, e.value) for e in events.Scalars("evaluate/auroc")] == [(tb_steps[-1], pytest.approx(auroc))]
    assert [(m.step, m.value) for m in client.get_metric_history(resumed_run.info.run_id, "evaluate/auroc")] == \
        [(tb_steps[-1], pytest.approx(auroc))]


def test_a_run_resumed_from_an_older_checkpoint_goes_on_in_its_trackers_from_that_step(tmp_path, caplog):
    """A run trained to step 16 (steps 9 to 16 in bf16, the others in fp32: a timeline of their own), whose last.pt
    is then replaced by the copy kept at step 8 and resumed to 16 in fp32: each tracker's active run holds one value
    per step, and those past 8 are the new timeline's (metrics.csv). MLflow cannot delete a point: the run goes on
    in a new MLflow run with the history up to step 8 copied, and the old one names it; W&B is rewound to step 8
    (offline: in the resumed segment's run record, replayed here as `wandb sync` replays it)."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from genlab import api, checkpoint

    run, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*RUN, "logger=[mlflow,wandb]", f"logger.mlflow.tracking_uri={store}", "logger.wandb.mode=offline"]
    api.train([*args, "trainer.max_steps=8", "trainer.precision=fp32"], run_dir=run)
    client = mlflow.MlflowClient(store)
    (first,) = client.search_runs([client.get_experiment_by_name("genlab").experiment_id])
    api.train([*args, "trainer.max_steps=16", "trainer.precision=bf16", f"resume={run}"], run_dir=run)
    abandoned = {int(row["step"]): float(row["train/loss_g"]) for row in rows_of(run)}
    shutil.copy(run / "checkpoints" / "epoch_0002.pt", run / "checkpoints" / "last.pt")
    with caplog.at_level("WARNING"):
        api.train([*args, "trainer.max_steps=16", "trainer.precision=fp32", f"resume={run}"], run_dir=run)
    expected = [(int(row["step"]), pytest.approx(float(row["train/loss_g"]), rel=1e-6)) for row in rows_of(run)]
    assert expected[-1][0] == 16 and any(abandoned[s] != v for s, v in expected if s > 8)  # two timelines

    active = checkpoint.load(run)["callbacks"]["mlflow"]["run_id"]
    history = sorted(client.get_metric_history(active, "train/loss_g"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == expected
    assert client.get_run(first.info.run_id).data.tags["genlab.superseded_by"] == active != first.info.run_id
    assert f"logger.mlflow: run {first.info.run_id} holds steps 9 to 16 of the timeline this resume abandons" in \
        caplog.text

    logged = [(h["_step"], h["train/loss_g"]) for h in wandb_timeline(run) if "train/loss_g" in h]
    assert logged == expected
    assert len({p.name for p in run.glob("wandb/offline-run-*/run-*.wandb")}) == 1  # one W&B run, three segments


def test_a_wandb_server_without_rewind_keeps_the_run_with_a_warning(tmp_path, monkeypatch, caplog):
    """Online, W&B's rewind is a preview of its cloud: where the server refuses it, the run goes on in the same W&B
    run after the last step it holds, and one warning says which steps of the abandoned timeline it keeps."""
    pytest.importorskip("wandb")
    from types import SimpleNamespace

    from genlab.trackers import WandB

    tracker, calls = WandB(tmp_path, {}, mode="online"), []
    tracker.load_state_dict({"run_id": "abc", "dir": "."})

    def init(**how):
        calls.append(how)
        if "resume_from" in how:
            raise RuntimeError("rewind is not enabled on this server")
        return SimpleNamespace(id="abc", step=17)  # W&B's next step: the run holds steps up to 16

    monkeypatch.setattr(tracker, "init", init)
    with caplog.at_level("WARNING"):
        tracker.on_fit_start(SimpleNamespace(step=8, saved=None))
    assert calls == [{"resume_from": "abc?_step=8"}, {"id": "abc", "resume": "allow"}] and tracker.held == 16
    assert ("logger.wandb: W&B could not rewind run abc to step 8 (rewind is not enabled on this server): it keeps "
            "its steps up to 16") in caplog.text


def test_a_moved_run_resumes_into_its_trackers_where_it_now_is(tmp_path):
    """The trackers' folders are kept relative to the run directory: a run renamed and then resumed writes its
    TensorBoard events and W&B files in its new place, and nothing where it was; so does one whose checkpoint holds
    them as absolute paths, as genlab kept them before (the folders are found again by their tail)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from genlab import api, checkpoint

    first, moved, again = tmp_path / "first", tmp_path / "moved", tmp_path / "again"
    args = [*RUN, "logger=[tensorboard,wandb]", "logger.wandb.mode=offline"]
    api.train([*args, "trainer.max_steps=4"], run_dir=first)
    first.rename(moved)
    api.train([*args, "trainer.max_steps=8", f"resume={moved}"], run_dir=moved)
    assert not first.exists()
    last = moved / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    assert state["callbacks"]["tensorboard"] == {"log_dir": "tensorboard"} and state["callbacks"]["wandb"]["dir"] == "."
    state["callbacks"]["tensorboard"]["log_dir"], state["callbacks"]["wandb"]["dir"] = str(moved / "tensorboard"), \
        str(moved)  # as genlab kept them before
    checkpoint.save(state, last)
    moved.rename(again)
    api.train([*args, "trainer.max_steps=12", f"resume={again}"], run_dir=again)
    assert not moved.exists()
    events = tensorboard_scalars(again / "tensorboard")
    assert [e.step for e in events.Scalars("train/loss_g")] == [int(row["step"]) for row in rows_of(again)]
    assert [int(row["step"]) for row in rows_of(again)][-1] == 12
    logged = [h["_step"] for h in wandb_timeline(again) if "train/loss_g" in h]
    assert logged == [int(row["step"]) for row in rows_of(again)]
    assert len(list(again.glob("wandb/offline-run-*/run-*.wandb"))) == 3


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "mlflow.py").write_text("raise ModuleNotFoundError(\"No module named 'mlflow'\", name='mlflow')\n")
    r = genlab("train", *RUN, "trainer.max_steps=2", "logger=mlflow", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 1
    assert r.stderr.strip() == ("genlab train: error: logger=mlflow needs MLflow, which is not installed: "
                                "pip install 'genlab[mlflow]'")


def test_a_tracker_setting_that_does_not_exist(tmp_path):
    r = genlab("train", *RUN, "trainer.max_steps=2", "logger=tensorboard", "+logger.tensorboard.logdir=x",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "logger.tensorboard.logdir is not a setting of TensorBoard; its settings are: log_dir" in r.stderr


def test_the_progress_gif_keeps_the_first_and_last_grid_and_a_bounded_size(tmp_path):
    """250 grids become 100 frames, evenly spread with the first and the last kept, and no side over 640 pixels."""
    import torch

    from genlab.images import save_gif, save_image

    paths = []
    for i in range(250):
        path = tmp_path / f"epoch_{i + 1:04d}.png"
        save_image(torch.full((3, 700, 350), i / 249), path)  # frame i is grey level i
        paths.append(path)
    save_gif(paths, tmp_path / "progress.gif")
    with Image.open(tmp_path / "progress.gif") as gif:
        assert gif.n_frames == 100 and gif.size == (320, 640)
        levels = []
        for frame in range(gif.n_frames):
            gif.seek(frame)
            levels.append(gif.convert("L").getpixel((10, 10)))
    assert levels[0] == 0 and levels[-1] == 255 and levels == sorted(levels)


def test_a_tracker_that_fails_is_one_line_at_the_start_and_left_out_later(tmp_path, caplog):
    """A tracker run that cannot be started stops the run before training with one line; one that fails mid-run
    (a server gone) is a warning, and the run trains on, with every other callback's end still called."""
    import torch

    from genlab import api
    from genlab.build import build_trainer
    from genlab.callbacks import Callback
    from genlab.errors import GenlabError
    from genlab.trackers import Tracker

    class Flaky(Tracker):
        def open(self, trainer):
            self.sent, self.closed = [], False

        def log_metrics(self, metrics, step):
            if step > 2:
                raise ConnectionError("server gone")
            self.sent.append(step)

        def log_image(self, name, image, step):
            pass

        def close(self, trainer):
            self.closed = True

    class Steady(Flaky):
        def log_metrics(self, metrics, step):
            self.sent.append(step)

    class Dead(Flaky):
        def open(self, trainer):
            raise ConnectionError("connection refused")

    class BadEnd(Callback):
        def on_fit_end(self, trainer):
            raise RuntimeError("a broken callback")

    cfg = api.compose("train", [*RUN, "trainer.max_steps=8", "trainer.log_every=2"])
    trainer = build_trainer(cfg, tmp_path / "a", torch.device("cpu"))
    flaky, ended = Flaky(tmp_path, {}), Steady(tmp_path, {})
    trainer.callbacks += [BadEnd(), flaky, ended]
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="a broken callback"):
        trainer.fit()
    assert trainer.step == 8 and flaky.sent == [2] and not flaky.closed and ended.closed and ended.sent == [2, 4, 6, 8]
    assert "logger.Flaky failed and is left out of the rest of this run: server gone" in caplog.text
    trainer = build_trainer(cfg, tmp_path / "b", torch.device("cpu"))
    trainer.callbacks.append(Dead(tmp_path, {}))
    with pytest.raises(GenlabError, match="^logger.Dead could not start its run: connection refused.$"):
        trainer.fit()
    assert trainer.step == 0


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_the_jobs_of_a_parallel_sweep_share_one_mlflow_store(tmp_path):
    """Jobs side by side (joblib) opening one new SQLite store: MLflow creates and migrates its tables on first use,
    and two jobs doing it together failed ("table runs already exists"); now each job has its run."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    r = genlab("train", "-m", "hydra/launcher=joblib", "logger=mlflow", *RUN, "trainer.max_steps=4",
               "optimizer.lr=0.0001,0.0002,0.0003", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
               env={"MLFLOW_TRACKING_URI": None})
    assert r.returncode == 0, r.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("genlab").experiment_id])
    assert sorted(x.data.params["optimizer.lr"] for x in runs) == ["0.0001", "0.0002", "0.0003"]
    assert {x.info.status for x in runs} == {"FINISHED"}
