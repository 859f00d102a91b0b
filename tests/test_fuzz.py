"""Bad input, tried systematically (Hypothesis): generated command lines and damaged files end in success or in
one clear `genlab VERB: error:` paragraph with a non-zero exit, never a traceback, and leave every earlier
checkpoint loadable.

CI runs a bounded, derandomized number of examples of each (GENLAB_FUZZ_EXAMPLES, 10 by default); the long run
is `pytest -m slow tests/test_fuzz.py` (GENLAB_FUZZ_LONG examples each, 300 by default), whose findings are
in docs/reliability.md.
"""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genlab import checkpoint

from conftest import fake_images, genlab_here, write_idx

EXAMPLES = int(os.environ.get("GENLAB_FUZZ_EXAMPLES", 10))
LONG = int(os.environ.get("GENLAB_FUZZ_LONG", 300))
BASE = ["device=cpu", "trainer.progress=false", "trainer.n_samples=4", "trainer.batch_size=16", "trainer.max_steps=2",
        "trainer.log_every=1"]
FAST = [*BASE, "dataset=synthetic", "dataset.n=64"]
OPTIONS = {"model": ["gan", "dcgan", "cgan", "vae", "vae_gan", "ddpm", "flow", "dcgan64"],
           "loss": ["bce", "minimax", "wasserstein", "hinge", "lsgan", "rals", "elbo"],
           "dataset": ["synthetic", "digits", "mnist", "folder"], "optimizer": ["adam", "sgd", "rmsprop"],
           "scheduler": ["constant", "cosine", "linear"]}

# --- values as a user types them --------------------------------------------------------------------

numbers = st.one_of(st.integers(-3, 6), st.sampled_from(["0", "-1", "1e9", "2.5", "-0.5", "1e-30", "nan", "inf", "-inf",
                                                         "10**3", "0x10", "1_000"]).map(str))
floats = st.one_of(st.floats(-10, 10, allow_nan=False).map(lambda f: f"{f:.3g}"),
                   st.sampled_from(["nan", "inf", "-inf", "0", "1e30", "-1e-9", "abc", "null", "true"]))
text = st.text(alphabet="abcxyz019_-.,:=[]{}()'\"$% ", max_size=12)
words = st.one_of(st.sampled_from(["auto", "fp32", "bf16", "fp16", "cpu", "cuda", "cuda:3", "mps", "stop", "skip", "tpu",
                                   "", "null", "30m", "1h30m", "90s", "-5m", "0s", "soon"]), text)
lists = st.lists(st.one_of(st.integers(-2, 12), st.sampled_from(["a", "1.5", "null"])), max_size=4).map(
    lambda xs: "[" + ",".join(map(str, xs)) + "]")
values = st.one_of(numbers, floats, words, lists)

KEYS = {
    "trainer.epochs": numbers, "trainer.max_steps": numbers, "trainer.batch_size": numbers, "trainer.log_every": numbers,
    "trainer.n_samples": numbers, "trainer.keep_every": numbers, "trainer.keep_last": numbers,
    "trainer.checkpoint_every": st.one_of(numbers, words), "trainer.precision": words, "trainer.on_nan": words,
    "trainer.ema.decay": floats, "trainer.compile": words, "optimizer.lr": floats, "optimizer.betas": lists,
    "optimizer.weight_decay": floats, "dataset.image_size": numbers, "dataset.channels": numbers,
    "dataset.classes": lists, "dataset.n": numbers, "dataset.root": words, "model.n_critic": numbers,
    "model.num_classes": numbers, "loss.gp_weight": floats, "seed": numbers, "device": words,
    "scheduler.warmup": numbers, "trainer.sampling.steps": numbers, "resume": words,
}


@st.composite
def override(draw) -> str:
    kind = draw(st.sampled_from(["setting", "setting", "setting", "group", "unknown", "raw"]))
    if kind == "setting":
        key = draw(st.sampled_from(sorted(KEYS)))
        return f"{key}={draw(KEYS[key])}"
    if kind == "group":
        group = draw(st.sampled_from(sorted(OPTIONS)))
        return f"{group}={draw(st.one_of(st.sampled_from(OPTIONS[group]), text))}"
    if kind == "unknown":
        return f"{draw(st.sampled_from(['+', '', '++', '~']))}{draw(st.sampled_from(['trainer.', 'model.', '']))}" \
               f"{draw(st.from_regex(r'[a-z_]{1,8}', fullmatch=True))}={draw(values)}"
    return draw(text)  # anything at all


# --- running genlab in this process -------------------------------------------------------------------


def run_genlab(*args) -> tuple[int, str]:
    """``genlab ARGS`` in this process: (exit status, what it wrote to stderr). An exception that escapes is a
    traceback the user would have seen: the test fails with it."""
    r = genlab_here(*args, cwd=os.getcwd())
    return r.returncode, r.stderr


def check_outcome(code: int, err: str, verb: str) -> None:
    assert "Traceback" not in err, err
    if code:
        assert f"genlab {verb}: error:" in err, f"exit {code} without genlab's error paragraph:\n{err}"
        assert err.count(f"genlab {verb}: error:") == 1, err


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished run: its checkpoints must stay loadable whatever the fuzzed commands do."""
    run = tmp_path_factory.mktemp("fuzz") / "good"
    code, err = run_genlab("train", "model=gan", *FAST, f"hydra.run.dir={run}")
    assert code == 0, err
    return run, (run / "checkpoints" / "last.pt").read_bytes()


def still_whole(good_run) -> None:
    run, data = good_run
    assert (run / "checkpoints" / "last.pt").read_bytes() == data
    checkpoint.load(run)


def fuzz_settings(n):
    return settings(max_examples=n, deadline=None, derandomize=n == EXAMPLES, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def command_lines(tmp_path, good_run, generated, verb):
    run, _ = good_run
    out = tmp_path / f"out{abs(hash(tuple(generated)))}"
    if verb == "train":
        limit = [] if any(g.startswith("trainer.max_time") for g in generated) else ["trainer.max_time=20s"]
        code, err = run_genlab("train", *FAST, *generated, *limit, f"hydra.run.dir={out}")
    else:
        code, err = run_genlab(verb, f"ckpt={run}", "n=4" if verb == "sample" else "n_samples=100",
                               *generated, f"hydra.run.dir={out}")
    check_outcome(code, err, verb)
    still_whole(good_run)


SIZES = [pytest.param(EXAMPLES, id="ci"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]  # examples each


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("verb", ["train", "sample", "evaluate"])
def test_generated_command_lines(verb, n, tmp_path, good_run):
    @fuzz_settings(n)
    @given(st.lists(override(), min_size=1, max_size=4 if n == EXAMPLES else 5))
    def check(generated):
        command_lines(tmp_path, good_run, generated, verb)

    check()


@pytest.mark.parametrize("verb,args", [
    ("train", ["model=1"]), ("evaluate", ["dataset=0"]),  # Hydra's own ValueError, printed as a traceback
    ("sample", ["+model.x=[]"]),  # a sampling setting named like an argument of draw(): a TypeError
])
def test_what_the_long_run_found(verb, args, tmp_path, good_run):
    """Inputs the long run (GENLAB_FUZZ_LONG=300) found tracebacks for, kept as cases of their own."""
    run, _ = good_run
    code, err = run_genlab(verb, *([] if verb == "train" else [f"ckpt={run}"]), *args, f"hydra.run.dir={tmp_path}")
    check_outcome(code, err, verb)
    assert code == 1


# --- damaged files ------------------------------------------------------------------------------------


def damage(data: bytes, how: str, at: float, byte: int) -> bytes:
    i = min(len(data) - 1, int(at * len(data)))
    if how == "truncate":
        return data[:i]
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (byte or 1)]) + data[i + 1:]
    return data[:i] + bytes([byte]) * 64 + data[i:]  # bytes inserted


damages = st.tuples(st.sampled_from(["truncate", "flip", "insert"]), st.floats(0, 1), st.integers(0, 255))


def damaged_checkpoint(tmp_path, good_run, how):
    run, data = good_run
    bad = tmp_path / f"bad{abs(hash(how))}.pt"
    bad.write_bytes(damage(data, *how))
    for verb, args in (("sample", [f"ckpt={bad}", "n=4"]), ("evaluate", [f"ckpt={bad}", "n_samples=100"]),
                       ("train", [f"resume={bad}", "trainer.max_steps=3"])):
        code, err = run_genlab(verb, *args, f"hydra.run.dir={tmp_path / ('o' + verb)}")
        check_outcome(code, err, verb)
    still_whole(good_run)


@pytest.mark.parametrize("n", SIZES)
def test_damaged_checkpoints(n, tmp_path, good_run):
    @fuzz_settings(n)
    @given(damages)
    def check(how):
        damaged_checkpoint(tmp_path, good_run, how)

    check()


def damaged_dataset(tmp_path, how, which):
    """A tiny MNIST in torchvision's layout with one of its files damaged, and a damaged dataset cache."""
    root = tmp_path / f"data{abs(hash((how, which)))}"
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(root / "MNIST" / "raw", prefix, *fake_images(n, 28, 28, seed=n))
    victim = root / "MNIST" / "raw" / which
    victim.write_bytes(damage(victim.read_bytes(), *how))
    args = ["model=gan", *BASE, "dataset=mnist", f"dataset.root={root}", "dataset.download=false"]
    code, err = run_genlab("train", *args, f"hydra.run.dir={tmp_path / 'o'}")
    check_outcome(code, err, "train")
    assert code == 0 or "mnist" in err.lower()  # refused for its data, not for the command line


@pytest.mark.parametrize("n", SIZES)
def test_damaged_dataset_files(n, tmp_path):
    @fuzz_settings(n)
    @given(damages, st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]))
    def check(how, which):
        damaged_dataset(tmp_path, how, which)

    check()


def test_damaged_caches_are_rebuilt(tmp_path, fake_root):
    """Every dataset cache damaged at once, at random: genlab decodes again and trains."""
    from genlab.data import cache_dir

    code, err = run_genlab("train", "model=gan", *BASE, "dataset=mnist", f"dataset.root={fake_root}",
                           "dataset.download=false", f"hydra.run.dir={tmp_path / 'a'}")
    assert code == 0, err

    @fuzz_settings(EXAMPLES)
    @given(damages)
    def check(how):
        for cache in [*(cache_dir() / "datasets").glob("mnist-*.pt"), *(cache_dir() / "datasets").glob("mnist-*.u8")]:
            cache.write_bytes(damage(cache.read_bytes(), *how))
        code, err = run_genlab("train", "model=gan", *BASE, "dataset=mnist", f"dataset.root={fake_root}",
                               "dataset.download=false", f"hydra.run.dir={tmp_path / 'b'}")
        assert code == 0, err

    check()


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable, for root too (chattr +i); skips where that is not permitted."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot make a folder read-only for root here (chattr +i)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o700)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder``: a disk that fills up; skips where mounting is not permitted."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_an_output_folder_that_cannot_be_written(tmp_path, good_run):
    """A read-only folder for the run, and a run directory on a disk that fills up while it trains: one clear
    line each, and what was saved before stays whole."""
    with read_only(tmp_path / "locked") as locked:
        code, err = run_genlab("train", *FAST, f"hydra.run.dir={locked / 'run'}")
        check_outcome(code, err, "train")
        assert code == 1
    with small_disk(tmp_path / "small", "6m") as disk:
        code, err = run_genlab("train", "model=gan", *FAST, f"hydra.run.dir={disk / 'run'}")
        assert code == 0, err  # one checkpoint fits
        first = (disk / "run" / "checkpoints" / "last.pt").read_bytes()
        code, err = run_genlab("train", f"resume={disk / 'run'}", "trainer.max_steps=4", f"hydra.run.dir={disk / 'run'}")
        check_outcome(code, err, "train")
        assert code == 1 and "could not write the checkpoint" in err and "the previous last.pt is intact" in err
        assert (disk / "run" / "checkpoints" / "last.pt").read_bytes() == first
        checkpoint.load(disk / "run")
    still_whole(good_run)
