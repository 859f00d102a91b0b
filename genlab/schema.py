"""The types of each command's own settings: `trainer.epochs=abc` is refused when the config is composed.

The YAML files in configs/ hold the values and their documentation; these dataclasses hold only the
types (every field is MISSING here). The settings of a model, dataset, loss or optimizer are checked
against the constructor their ``_target_`` names, in genlab.build.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from genlab.errors import GenlabError


@dataclass
class EMASchema:
    decay: Optional[float] = MISSING
    warmup: bool = MISSING


@dataclass
class TrainerSchema:
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    max_time: Optional[str] = MISSING
    batch_size: int = MISSING
    accumulate: int = MISSING
    precision: str = MISSING
    on_nan: str = MISSING
    log_every: int = MISSING
    n_samples: int = MISSING
    write_share: float = MISSING
    checkpoint_every: Any = MISSING  # epochs (an int), or a duration with its unit (10m)
    keep_every: int = MISSING
    keep_last: int = MISSING
    best: Optional[str] = MISSING
    progress: bool = MISSING
    compile: bool = MISSING
    detect_anomaly: bool = MISSING
    deterministic: bool = MISSING
    ema: EMASchema = field(default_factory=EMASchema)
    sampling: Dict[str, Any] = field(default_factory=dict)  # checked against the model's generate()


@dataclass
class EvaluationSchema:
    metrics: list[str] = MISSING
    every: int = MISSING
    n_samples: int = MISSING


@dataclass
class TrialSchema:
    storage: Optional[str] = MISSING
    study: Optional[str] = MISSING
    number: Optional[int] = MISSING
    objective: Optional[str] = MISSING


@dataclass
class TeacherSchema:
    run: Optional[str] = MISSING
    steps: int = MISSING
    sampler: str = MISSING
    init: bool = MISSING


@dataclass
class TrainSchema:
    seed: int = MISSING
    device: str = MISSING
    resume: Optional[str] = MISSING
    tags: list[str] = field(default_factory=list)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    model: Any = MISSING  # checked against their constructors (genlab.build)
    dataset: Any = MISSING
    loss: Any = None  # null for models that own their objective
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    callbacks: Any = None  # the writers, by name (configs/callbacks/), checked when built
    sampler: Any = None  # a sampler's node (configs/sampler/): the grids' and in-training FID's sampling setting
    logger: Any = None  # trackers and callbacks of your own, by name (configs/logger/), checked when built
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    trial: TrialSchema = field(default_factory=TrialSchema)
    teacher: TeacherSchema = field(default_factory=TeacherSchema)


@dataclass
class FromCheckpointSchema:
    """What every command that reads a checkpoint takes."""

    ckpt: str = MISSING
    seed: int = MISSING
    device: str = MISSING
    dataset_root: Optional[str] = MISSING
    ema: bool = MISSING
    precision: str = MISSING
    compile: str = MISSING  # auto | true | false
    batch_size: int = MISSING
    sampler: Any = None  # a sampler's node (configs/sampler/), passed to the model as its sampling setting


@dataclass
class SampleSchema(FromCheckpointSchema):
    format: str = MISSING
    n: Optional[int] = MISSING
    labels: Optional[list[int]] = MISSING
    interp_rows: int = MISSING
    interp_steps: int = MISSING
    method: str = MISSING
    n_latent: int = MISSING


@dataclass
class EvaluateSchema(FromCheckpointSchema):
    ckpt: Optional[str] = MISSING
    samples: Optional[str] = MISSING
    dataset: Any = None  # with samples=DIR
    task: str = MISSING
    score: Any = None  # an anomaly score's node (configs/score/), or null: the model's default
    normal_classes: Optional[list[int]] = MISSING
    n_samples: int = MISSING
    inception_weights: Optional[str] = MISSING
    threshold: Any = MISSING  # f1_max | quantile:Q | fpr:X | a number (genlab.detection.threshold)
    map_sigma: float = MISSING
    pro_limit: float = MISSING


@dataclass
class PredictSchema:
    ckpt: str = MISSING
    images: str = MISSING
    score: Any = None  # an anomaly score's node (configs/score/), or null: the one the threshold was chosen for
    threshold: Any = MISSING  # null: the run's stored one
    maps: bool = MISSING
    device: str = MISSING
    ema: bool = MISSING
    batch_size: int = MISSING
    dataset_root: Optional[str] = MISSING


@dataclass
class ExportSchema:
    ckpt: str = MISSING
    format: str = MISSING
    out: Optional[str] = MISSING
    ema: bool = MISSING
    score: Any = None  # the anomaly score of the scorer graph (configs/score/), or null: the model's default
    dataset_root: Optional[str] = MISSING
    sampler: Any = None  # the generator graph's sampler (configs/sampler/)


SCHEMAS = {"train": TrainSchema, "sample": SampleSchema, "evaluate": EvaluateSchema, "predict": PredictSchema,
           "export": ExportSchema}


def register() -> None:
    """Make the schemas available to the primary configs' defaults lists (``- train_schema``)."""
    cs = ConfigStore.instance()
    for verb, node in SCHEMAS.items():
        cs.store(name=f"{verb}_schema", node=node)


def sampling_overrides(cfg: DictConfig, verb: str) -> dict:
    """`genlab sample steps=20`: the top-level keys of sample and evaluate that are not the command's own are
    settings for the model's sampling (checked against the model once it is loaded), and so is ``sampler=`` (a
    config group of the command's, whose node the model's sampling setting ``sampler`` takes)."""
    if verb == "train":
        return {}
    own = {f.name for f in dataclasses.fields(SCHEMAS[verb])} - {"sampler"}
    free = {k: cfg[k] for k in cfg if k not in own and not (k == "sampler" and cfg[k] is None)}
    return OmegaConf.to_container(OmegaConf.create(free), resolve=True)


def free_keys(verb: str, arg: str) -> str:
    """Hydra adds a key its config lacks only as ``+key=value`` (``++``: add or override). genlab takes the
    model's sampling settings without it: ``genlab sample steps=20``, ``genlab train trainer.sampling.steps=20``."""
    key, eq, _ = arg.partition("=")
    if not eq or key.startswith(("+", "~", "-")) or "/" in key:
        return arg
    if verb == "train":
        free = key.startswith("trainer.sampling.")
    else:
        free = "." not in key and key not in {f.name for f in dataclasses.fields(SCHEMAS[verb])} and key != "hydra"
    return f"++{arg}" if free else arg


def check_keys(cfg: DictConfig, verb: str) -> None:
    """Hydra lets ``+key=value`` add any key, even to a typed config: refuse the ones nothing reads."""

    def walk(node, schema, prefix):
        fields = {f.name: f.type for f in dataclasses.fields(schema)}
        for key in node:
            if not prefix and key in free:
                continue
            if key not in fields:
                raise GenlabError(f"{prefix}{key} is not a setting of genlab {verb} (a typo?); "
                                  f"the settings{' of ' + prefix.rstrip('.') if prefix else ''} are: {', '.join(fields)}.")
            if dataclasses.is_dataclass(fields[key]):
                walk(node[key], fields[key], f"{prefix}{key}.")

    free = sampling_overrides(cfg, verb)
    walk(cfg, SCHEMAS[verb], "")
