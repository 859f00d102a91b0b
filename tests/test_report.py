"""genlab report: the page of a run and of a sweep, read as data and opened in a real browser (headless Chromium,
Debian's chromium and chromium-driver packages, which .ci/run installs)."""

import json
import re
import shutil

import pytest

from genlab import report, runs

from conftest import genlab

# two normal classes x two seeds: a one-class sweep with a spread over seeds
SWEEP = ["model=vae", "dataset.classes=[0],[1]", "seed=0,1", "trainer.batch_size=32", "trainer.max_steps=40",
         "trainer.log_every=20", "trainer.n_samples=16", "device=cpu", "trainer.precision=fp32", "optimizer.lr=1e-3"]


@pytest.fixture(scope="module")
def evaluated_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("rep")
    r = genlab("train", "-m", *SWEEP, f"hydra.sweep.dir={cwd / 'sweep'}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    r = genlab("evaluate", f"ckpt={cwd / 'sweep'}", f"hydra.run.dir={cwd / 'eval'}", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd


def test_evaluate_notes_where_its_reports_went(evaluated_sweep):
    sweep = evaluated_sweep / "sweep"
    assert json.loads((sweep / runs.EVALUATIONS).read_text())[0]["dir"] == str((evaluated_sweep / "eval").resolve())
    where, found = runs.evaluations(sweep / "2")["anomaly"]
    assert where == (evaluated_sweep / "eval" / "2").resolve() and found["normal_classes"] == [1]


def _record_many(run_dir, who):
    for i in range(25):
        runs.record_evaluation(run_dir, "quality", run_dir / f"eval_{who}_{i}")


def test_evaluations_at_once_each_keep_their_entry(tmp_path):
    """Several `genlab evaluate` of one run at once (a sweep of evaluations): each report's entry is kept."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(tmp_path, who)) for who in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    entries = json.loads((tmp_path / runs.EVALUATIONS).read_text())
    assert len(entries) == 4 * 25 == len({e["dir"] for e in entries})


def test_sweep_page_data(evaluated_sweep):
    page = report.gather([evaluated_sweep / "sweep"])
    assert [r["name"] for r in page["runs"]] == ["0", "1", "2", "3"]
    assert page["varying"] == ["dataset.classes", "seed"]
    auroc = page["columns"].index("AUROC")
    values = [row[auroc]["sort"] for row in page["rows"]]
    assert page["best"] == values.index(max(values))
    per_class = next(t for t in page["summary_tables"] if t["title"].startswith("AUROC per normal class"))
    cells = [[c["text"] for c in row[:2]] for row in per_class["rows"]]
    assert cells == [["0", "2"], ["1", "2"], ["mean over classes", "4"]]
    class0 = [v for row, v in zip(page["runs"], values) if row["overrides"][1] == "dataset.classes=[0]"]
    assert per_class["rows"][0][2]["sort"] == pytest.approx(sum(class0) / 2)
    assert "±" in per_class["rows"][0][2]["text"]  # two seeds: a spread


def test_report_pages_stand_alone(evaluated_sweep):
    r = genlab("report", str(evaluated_sweep / "sweep"), cwd=evaluated_sweep)
    assert r.returncode == 0, r.stderr
    html = (evaluated_sweep / "sweep" / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)  # nothing fetched from the network
    assert html.count('<tr class="best"') == 1 and html.count("data:image/png;base64,") >= 4 + 4 + 4
    r = genlab("report", str(evaluated_sweep / "sweep" / "1"), "-o", str(evaluated_sweep / "one.html"),
               cwd=evaluated_sweep)
    assert r.returncode == 0, r.stderr
    one = (evaluated_sweep / "one.html").read_text()
    assert "ROC curve" in one and "data:image/gif;base64," in one and "AUROC" in one


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no run"),
])
def test_report_bad_paths(tmp_path, make, message):
    r = genlab("report", str(make(tmp_path)), cwd=tmp_path)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("genlab report: error:") and len(r.stderr.strip().splitlines()) == 1


# ---- in a real browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield b
    b.quit()


def open_page(browser, path):
    browser.get(path.resolve().as_uri())
    browser.get_log("browser")  # what an earlier page left
    browser.refresh()
    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)")
    assert broken == []
    assert console_errors(browser) == []


def console_errors(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def column(browser, head: str) -> list[str]:
    heads = [th.text.rstrip(" ↕↑↓") for th in browser.find_elements("css selector", "#runs th")]
    i = heads.index(head)
    return [row.find_elements("css selector", "td")[i].text for row in browser.find_elements("css selector", "#runs tbody tr")]


def test_sweep_page_in_a_browser(evaluated_sweep, browser):
    out = evaluated_sweep / "sweep" / "report.html"
    report.write([evaluated_sweep / "sweep"], out)
    open_page(browser, out)
    assert len(browser.find_elements("css selector", "#runs tbody tr")) == 4
    assert len(browser.find_elements("css selector", "#runs img.thumb")) == 4
    assert browser.find_element("css selector", "#runs tr.best").get_attribute("data-run") in "0123"
    assert column(browser, "run") == ["0", "1", "2", "3"]
    heading = next(th for th in browser.find_elements("css selector", "#runs th") if th.text.startswith("AUROC"))
    heading.click()
    up = [float(v) for v in column(browser, "AUROC")]
    assert up == sorted(up) and heading.get_attribute("aria-sort") == "ascending"
    heading.click()
    down = [float(v) for v in column(browser, "AUROC")]
    assert down == sorted(up, reverse=True)
    run = next(th for th in browser.find_elements("css selector", "#runs th") if th.text.startswith("run"))
    run.click()
    run.click()
    assert column(browser, "run") == ["3", "2", "1", "0"]
    tables = [t.text for t in browser.find_elements("css selector", "h3")]
    assert any(t.startswith("AUROC per normal class") for t in tables)
    assert console_errors(browser) == []  # the clicks raised nothing


def test_run_page_in_a_browser(evaluated_sweep, browser, tmp_path):
    out = report.write([evaluated_sweep / "sweep" / "0"], tmp_path / "run.html")
    open_page(browser, out)
    alts = [i.get_attribute("alt") for i in browser.find_elements("css selector", "img")]
    assert "loss curves" in alts and "progress animation" in alts and "ROC curve" in alts
    assert any(a.startswith("epoch ") for a in alts)
    assert "AUROC" in browser.find_element("tag name", "body").text


def test_each_run_records_what_it_ran_on(evaluated_sweep):
    """env.json in every run directory, train's and evaluate's, read back into the report's page."""
    import torch

    from genlab import environment

    env = environment.read(evaluated_sweep / "sweep" / "0")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["precision"] == "fp32"
    assert env["processes"] == 1 and env["cpu_count"] >= 1 and env["genlab"]
    if (environment.SOURCE / ".git").exists():  # run from a checkout: its commit
        assert len(env["commit"]) == 40 and isinstance(env["dirty"], bool)
    assert environment.read(evaluated_sweep / "eval")["device"] == "cpu"
    page = report.gather([evaluated_sweep / "sweep" / "0"])
    assert f"torch {torch.__version__}" in page["runs"][0]["environment"]


def test_a_run_resumed_elsewhere_keeps_its_earlier_environment(tmp_path, monkeypatch):
    from genlab import environment

    first = environment.record(tmp_path, "cpu", "fp32")
    environment.record(tmp_path, "cpu", "fp32")  # the same machine again: nothing to keep
    assert "earlier" not in environment.read(tmp_path)
    monkeypatch.setattr(environment, "cpu_model", lambda: "another CPU")
    environment.record(tmp_path, "cpu", "bf16")
    env = environment.read(tmp_path)
    assert env["cpu"] == "another CPU" and env["precision"] == "bf16"
    assert [e["cpu"] for e in env["earlier"]] == [first["cpu"]]
    assert environment.read(tmp_path / "nowhere") is None


# ---- a hyperparameter search's page ------------------------------------------------------------------------

LRS = [0.0012345678901234, 0.00031622776601683794, 0.009876543210987654, 0.0005011872336272725]
LOSSES = [31.5, 27.25, 5.0e5, 29.0]  # trial 2 diverged


@pytest.fixture(scope="module")
def search_sweep(tmp_path_factory):
    """A search of four trials as genlab's Optuna sweeper leaves it, one diverged: each trial's run directory (its
    overrides, the sweeper's trial.* among them, metrics.csv, status.json), and the study's results written by the
    sweeper's own code."""
    optuna = pytest.importorskip("optuna")
    from hydra_plugins.genlab_optuna_sweeper.optuna_sweeper import write_results

    from genlab import plots

    sweep = tmp_path_factory.mktemp("search")
    study = optuna.create_study(study_name="vae_digits", direction="minimize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for i, (rate, loss) in enumerate(zip(LRS, LOSSES)):
        run = sweep / str(i)
        (run / ".hydra").mkdir(parents=True)
        overrides = ["hparams_search=vae_digits", f"optimizer.lr={rate!r}", "model.encoder.width=32",
                     f"trial.storage=sqlite:///{sweep}/study.db", "trial.study=vae_digits", f"trial.number={i}",
                     "trial.objective=val/loss"]
        (run / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
        (run / ".hydra" / "config.yaml").write_text("model: {_target_: genlab.models.VAE}\ndataset: {_target_: digits}\n")
        (run / "metrics.csv").write_text(f"step,epoch,train/loss,val/loss,img_per_s,wall_time\n"
                                         f"230,10,{loss * 1.1},{loss},900.0,12.5\n")
        (run / "status.json").write_text(json.dumps({"status": "completed"}))
        study.add_trial(optuna.trial.create_trial(params={"optimizer.lr": rate}, distributions={"optimizer.lr": lr},
                                                  value=loss, user_attrs={"run_dir": str(run)}))
    scales = []
    trials = plots.trials
    plots.trials = lambda *a, **k: scales.append(trials(*a, **k))  # the axis scale the plot was drawn with
    try:
        write_results(study, sweep, "val/loss", "sqlite:///study.db")
    finally:
        plots.trials = trials
    return sweep, scales


def test_a_search_page_leads_with_its_objective_and_marks_the_best_trial(search_sweep):
    sweep, scales = search_sweep
    assert scales == ["log"]  # one diverged trial (5e5) does not flatten the other three into a line
    page = report.gather([sweep])
    assert page["columns"][:3] == ["run", "val/loss", "optimizer.lr"]  # the objective first, then what was searched
    assert page["best"] == 1 and page["search"]["best"] == "1" and page["search"]["value"] == "27.25"
    assert page["common"] == ["hparams_search=vae_digits", "model.encoder.width=32"]  # no trial.* plumbing
    assert "trial.number" not in page["varying"]
    assert [row[2]["text"] for row in page["rows"]] == ["0.001235", "0.0003162", "0.009877", "0.0005012"]
    assert [row[2]["sort"] for row in page["rows"]] == LRS  # sorted by value, not as text
    assert any(p["name"] == "trials.png" for p in page["sweep_plots"])
    assert plots_scale([1.0, 2.0, 3.0]) == "linear" and plots_scale([-1.0, 2.0, -1.5, 3e4]) == "symlog"


def plots_scale(values):
    from genlab import plots

    return plots.value_scale(values)


def test_a_search_page_reads_at_1280_pixels(search_sweep, browser, tmp_path):
    sweep, _ = search_sweep
    out = report.write([sweep], tmp_path / "search.html")
    open_page(browser, out)
    browser.set_window_size(1280, 1000)
    lead = browser.find_element("css selector", "p.lead").text
    assert lead.startswith("A search of 4 trials for the lowest val/loss: the best is trial 1, val/loss 27.25, with optimizer.lr=0.0003162")
    assert browser.find_element("css selector", "#runs tr.best").get_attribute("data-run") == "1"
    heading = next(th for th in browser.find_elements("css selector", "#runs th") if th.text.startswith("val/loss"))
    assert heading.rect["x"] + heading.rect["width"] <= 1280  # on screen, not off to the right
    assert column(browser, "optimizer.lr") == ["0.001235", "0.0003162", "0.009877", "0.0005012"]


def test_tags_reach_the_page_and_a_resume_may_add_some(tmp_path):
    r = genlab("train", "model=gan", "dataset=synthetic", "dataset.n=64", "trainer.batch_size=32",
               "trainer.max_steps=2", "tags=[baseline,small]", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab("train", f"resume={tmp_path / 'a'}", "trainer.max_steps=3", "tags=[baseline,small,resumed]",
               f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # where and how a run is found may change on resume
    page = report.gather([tmp_path / "a", tmp_path / "b"])
    assert [r["tags"] for r in page["runs"]] == [["baseline", "small"], ["baseline", "small", "resumed"]]
    assert page["columns"][1] == "tags" and page["rows"][1][1]["text"] == "baseline small resumed"
