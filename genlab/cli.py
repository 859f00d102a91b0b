"""``genlab VERB [hydra overrides]``: each verb is a Hydra app with its own primary config."""

import importlib
import importlib.util
import io
import logging
import os
import re
import sys
from pathlib import Path

from genlab import __version__, errors, schema
from genlab.config import CONFIG_DIR
from genlab.errors import GenlabError, Interrupted, first_line

# verb -> (module with run(cfg, run_dir, overrides), one-line description); config: configs/<verb>.yaml
VERBS = {
    "train": ("genlab.train", "train a model; writes checkpoints, sample grids, metrics.csv, loss curves"),
    "sample": ("genlab.sample", "pictures from a checkpoint: sample grid, interpolations, reconstructions, latent map"),
    "evaluate": ("genlab.evaluate", "reports on a checkpoint: anomaly-detection ROC/AUC (one run or a whole sweep)"),
    "predict": ("genlab.predict", "score a folder of new images: predictions.csv and anomaly maps, at the run's threshold"),
    "export": ("genlab.export", "a run as a folder to share: safetensors, a model card, TorchScript or ONNX graphs"),
}
# verbs that are not Hydra apps: verb -> (module with main(argv) -> exit status, one-line description)
PLAIN = {"report": ("genlab.report", "an HTML page of runs and sweeps: PATH... [-o report.html]")}

USAGE = f"""usage: genlab COMMAND [OVERRIDES...] [--help] [-m/--multirun] [--cfg job]

genlab {__version__}: a config-driven experiment runner for generative image models.

commands:
{chr(10).join(f"  {verb:<10}{desc}" for verb, (_, desc) in {**VERBS, **PLAIN}.items())}

Each command is a Hydra app: pick configs and set values with overrides, e.g.
  genlab train model=dcgan dataset=mnist dataset.root=~/data trainer.epochs=5
  genlab train -m optimizer.lr=1e-4,2e-4,5e-4        (a sweep)
  genlab train --help                                 (its config groups and options)

options:
  -h, --help     show this message
  -V, --version  print the version
"""


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-sc"], ["--shell-completion"]):
        verb = _completion_verb(args)
        if verb is None:
            return 0
    elif not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    elif args[0] in ("-V", "--version"):
        print(f"genlab {__version__}")
        return 0
    else:
        verb, args = args[0], args[1:]
    if verb in PLAIN:
        return importlib.import_module(PLAIN[verb][0]).main(args)
    if verb not in VERBS:
        print(f"genlab: unknown command '{verb}'; commands: {', '.join({**VERBS, **PLAIN})} (genlab --help)",
              file=sys.stderr)
        return 2
    if not (CONFIG_DIR / f"{verb}.yaml").is_file():
        print(f"genlab: configs not found at {CONFIG_DIR}: the installation is incomplete; reinstall genlab "
              "(pip install genlab-*.whl, or pip install -e . in its checkout).", file=sys.stderr)
        return 2
    problem = _missing_plugin(args) or (None if set(args) & INFO_FLAGS else _unwritable_output(args))
    if problem is None and not set(args) & INFO_FLAGS:
        args, problem = _one_of_several(verb, args)
    if problem:
        print(f"genlab {verb}: error: {problem}", file=sys.stderr)
        return 1
    if not set(args) & {"-sc", "--shell-completion"}:  # completion's own query=... must reach Hydra as it is
        args = [schema.free_keys(verb, a) for a in args]
    sys.argv = [sys.argv[0], *args]
    with _held_stderr(verb):
        _hydra_app(verb)()
    return 0


class _held_stderr:
    """Hydra reports a command line it cannot compose (an option that does not exist, a value of the wrong type,
    a typo in the override grammar) in its own words, then exits 1. Until genlab's task starts, what Hydra writes
    to stderr is held back, and such a report comes out as one ``genlab VERB: error:`` paragraph."""

    def __init__(self, verb: str):
        self.verb = verb

    def __enter__(self):
        self.real, self.held = sys.stderr, io.StringIO()
        sys.stderr = self.held
        errors.hold(self.release)
        return self

    def release(self) -> None:
        if sys.stderr is self.held:
            sys.stderr = self.real
            self.real.write(self.held.getvalue())

    def __exit__(self, kind, error, tb):
        refused = sys.stderr is self.held and kind is SystemExit and error.code not in (0, None)
        said = f"genlab {self.verb}: error:" in self.held.getvalue()  # genlab's own sweeper said it already
        if refused and not said and os.environ.get("HYDRA_FULL_ERROR") != "1":
            sys.stderr = self.real
            print(f"genlab {self.verb}: error: {hydra_report(self.held.getvalue())}", file=sys.stderr)
        self.release()
        return False


def hydra_report(text: str) -> str:
    """Hydra's report of a command line it refused, as one paragraph: its hints and search path left out, an
    indented list joined onto the line that introduces it. An error Hydra did not expect (it prints a traceback)
    is its last line, the exception's message."""
    if "Traceback (most recent call last):" in text:
        raised = [line for line in text.splitlines() if re.match(r"^[A-Za-z_.]+(Error|Exception): ", line)]
        if raised:
            message = raised[-1].split(": ", 1)[1].strip()
            if "Config group override must be" in message:  # model=1: Hydra reads the 1 as a number
                message += " (a config group takes the name of one of its options, e.g. model=dcgan"
                message += "; ~GROUP drops the one a preset chose, e.g. ~augment)" if "NoneType" in message else ")"
            return message if message.endswith(".") else message + "."
    lines, listing, searchpath = [], False, False
    for line in text.splitlines():
        if line.startswith(("Set the environment variable HYDRA_FULL_ERROR", "See https://hydra.cc")):
            continue
        searchpath = line.startswith("Config search path") or (searchpath and line[:1].isspace())
        detail = line.strip().startswith(("full_key:", "reference_type=", "object_type=", "key:", "value:"))
        if searchpath or detail or not line.strip():
            continue
        if line[:1].isspace() and lines:  # a list item under "Available options in 'model':"
            lines[-1] += (", " if listing else " ") + line.strip()
            listing = True
            continue
        listing = False
        lines.append(line.strip())
    return " ".join(l if l.endswith((".", ":")) or l is lines[-1] else l + "." for l in lines) or text.strip()


INFO_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}

# a process of a multi-process run other than rank 0 writes nothing: no run directory of its own, no .hydra/,
# no log file; it learns rank 0's run directory once the processes have met (genlab.train)
QUIET_RANK = ["hydra.run.dir=.", "hydra.output_subdir=null", "~hydra.job_logging.handlers.file",
              "hydra.job_logging.root.handlers=[console]", "hydra.job_logging.root.level=WARNING"]


def _one_of_several(verb: str, args: list[str]) -> tuple[list[str], str | None]:
    """Under torchrun or srun (several processes), only `genlab train` of one run; ranks above 0 stay quiet."""
    from genlab import dist

    launched = dist.launched()
    if launched is None:
        return args, None
    if verb != "train":
        return args, f"genlab {verb} runs in one process; start it without torchrun or srun."
    if {"-m", "--multirun"} & set(args):
        return args, ("a sweep (-m) cannot run inside torchrun or srun: each run of it would need its own processes. "
                      "Start one torchrun per setting, or sweep with hydra/launcher=submitit_slurm, which gives each "
                      "run its own GPUs.")
    return (args + QUIET_RANK if launched[0] > 0 else args), None


# (group, option) -> the modules it needs and the package that has them: Hydra's launcher plugins, which genlab's
# `scale` extra installs. genlab's own presets (launcher=submitit_slurm, configs/launcher/) use the same plugins.
PLUGINS = {
    "joblib": (["hydra_plugins.hydra_joblib_launcher"], "hydra-joblib-launcher"),
    "submitit_slurm": (["hydra_plugins.hydra_submitit_launcher", "submitit"], "hydra-submitit-launcher"),
    "submitit_local": (["hydra_plugins.hydra_submitit_launcher", "submitit"], "hydra-submitit-launcher"),
}
NEEDS_PLUGIN = {(group, option): need for option, need in PLUGINS.items() for group in ("hydra/launcher", "launcher")}


def _missing_plugin(args) -> str | None:
    """Hydra answers a launcher whose plugin is not installed with "Could not find 'hydra/launcher/joblib'" and
    its search path: name the extra that has it instead."""
    for a in args:
        key, _, value = a.partition("=")
        modules, package = NEEDS_PLUGIN.get((key.lstrip("+~"), value), ([], None))
        if not all(map(_importable, modules)):
            return f"{a} needs {package}, which is not installed: pip install 'genlab[scale]'"
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def _unwritable_output(args) -> str | None:
    """Hydra makes the run directory before genlab's code runs, with a traceback when it cannot:
    check first that the place it goes (``outputs/`` or ``hydra.run.dir``/``hydra.sweep.dir``) can be written."""
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(args) else "hydra.run.dir"
    target = "outputs"
    for a in args:
        k, _, value = a.partition("=")
        if k == key:
            target = value.split("$", 1)[0]  # up to the first interpolation, e.g. ${now:...}
    if not target:  # the place is an interpolation (${oc.env:HOME}/...): Hydra's to resolve
        return None
    p = Path(target).expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"cannot make the run directory {target}: {p} is a file, not a directory."
    if not os.access(p, os.W_OK | os.X_OK):
        return f"cannot make the run directory {target}: {p} is not writable. Run from another folder or set hydra.run.dir=..."
    return None


def execute(verb: str, cfg, run_dir: Path, overrides: list[str]):
    """Check a composed config and run the command on it: what `genlab VERB` does, and genlab.api too. Returns
    what the command's run returns (train: its metrics, which a sweeper reads)."""
    from omegaconf import OmegaConf

    schema.check_keys(cfg, verb)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise GenlabError(f"genlab {verb} needs a value for {', '.join(missing)}: e.g. genlab {verb} {missing[0]}=...")
    return importlib.import_module(VERBS[verb][0]).run(cfg, run_dir, overrides)


def out_of_memory(verb: str, cfg, error: BaseException) -> str:
    """What to try when a command runs out of memory, for the batch size it ran with."""
    key = "trainer.batch_size" if verb == "train" else "batch_size"
    batch = cfg.trainer.batch_size if verb == "train" else cfg.get("batch_size")
    where = "the GPU" if "CUDA" in str(error) or "cuda" in str(error) else "this machine"
    tries = [f"{key}={max(1, batch // 2)} (now {batch})"] if isinstance(batch, int) else []
    if verb == "train":
        tries += ["trainer.precision=bf16 (or fp16 on GPUs without bf16)", "a smaller network (model.*.width)",
                  "several GPUs with torchrun, each holding a slice of the batch"]
    return f"out of memory on {where} ({first_line(error)[:160]}). Try {', or '.join(tries)}."


def _hydra_app(verb: str):
    import hydra

    schema.register()
    _register_sweeper()

    def task(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from genlab import dist, runs, sweep

        errors.composed()  # Hydra composed the command line: genlab speaks for itself now
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        launched = dist.launched()
        rank = launched[0] if launched else 0
        if rank:  # rank 0 logs for the run (a SLURM job's tasks share one train.log)
            logging.getLogger().setLevel(logging.WARNING)
        else:
            runs.mark_latest(run_dir, verb)  # outputs/<verb>/latest
        job = None
        if hc.mode == RunMode.MULTIRUN and not rank:  # a job of a sweep: it records how it ends, and a failure lets
            job = sweep.Job(run_dir, hc.job.num, hc.overrides.task)  # the sweep go on
            sweep.share_cpus(hc.launcher)
        return _run_task(verb, cfg, run_dir, list(hc.overrides.task), rank, job)

    task.__module__ = f"genlab.{verb}"
    return hydra.main(config_path=str(CONFIG_DIR), config_name=verb, version_base="1.3")(task)


def _run_task(verb: str, cfg, run_dir: Path, overrides: list[str], rank: int, job):
    """One command in Hydra's task: its result, or its error said in one line (a bug's traceback) with the exit
    status it calls for; a job of a sweep records how it ended and lets the sweep go on."""
    import torch

    who = f"genlab {verb}" + (f" (rank {rank})" if rank else "")
    try:
        try:
            result = execute(verb, cfg, run_dir, overrides)
        except (MemoryError, torch.OutOfMemoryError) as e:  # the host's, a GPU's
            raise GenlabError(out_of_memory(verb, cfg, e)) from e
    except KeyboardInterrupt as e:
        if job is not None:
            job.end(e)
        print(f"{who}: interrupted; the run directory is {run_dir}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        known = isinstance(e, (GenlabError, OSError))  # OSError: a file that cannot be written or read, a full disk
        alone = job is None or isinstance(e, Interrupted)  # one run, or a signal: the process ends here
        record = job.end(e) if job is not None else None
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or (alone and not known):
            raise
        if known and not (rank and getattr(e, "shared", False)):  # rank 0 says what every rank met
            print(f"{who}: error: {e}", file=sys.stderr)
        elif not known:  # a bug, met by one job of a sweep: its traceback, and the sweep goes on
            logging.getLogger(__name__).exception("genlab %s: error in %s", verb, run_dir)
        if alone:
            sys.exit(getattr(e, "exit_code", 1))
        return record
    if not rank:
        print(f"genlab {verb}: run directory {run_dir}")
    return {**(result or {}), **job.end()} if job is not None else result


def _register_sweeper() -> None:
    """genlab's Optuna sweeper (hydra/sweeper=optuna) for an editable install too: Hydra finds plugins by listing
    the folders of the hydra_plugins package, and an editable install's import hook lists none."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.genlab_optuna_sweeper.optuna_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)


def _completion_verb(args):
    """Shell completion calls ``genlab -sc query=bash`` with the whole line in COMP_LINE."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) >= 2 and words[1] in VERBS and (len(words) > 2 or line.endswith(" ")):
        os.environ["COMP_LINE"] = line.replace(f" {words[1]}", "", 1)
        return words[1]
    if any(a.startswith("query=") for a in args):
        prefix = words[1] if len(words) > 1 else ""
        print(" ".join(v for v in VERBS if v.startswith(prefix)))
        return None
    return "train"  # -sc install=bash / uninstall: the script is the same for every verb


if __name__ == "__main__":
    sys.exit(main())
