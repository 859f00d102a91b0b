"""The types of each command's own settings: `trainer.epochs=abc` is refused when the config is composed.

The YAML files in configs/ hold the values and their documentation; these dataclasses hold only the
types (every field is MISSING here). The settings of a model, dataset, loss or optimizer are checked
against the constructor their ``_target_`` names, in genlab.build.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from genlab.errors import GenlabError


@dataclass
class TrainerSchema:
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    batch_size: int = MISSING
    precision: str = MISSING
    on_nan: str = MISSING
    log_every: int = MISSING
    n_samples: int = MISSING
    checkpoint_every: int = MISSING
    keep_every: int = MISSING
    keep_last: int = MISSING
    progress: bool = MISSING
    compile: bool = MISSING


@dataclass
class TrainSchema:
    seed: int = MISSING
    device: str = MISSING
    resume: Optional[str] = MISSING
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    model: Any = MISSING  # checked against their constructors (genlab.build)
    dataset: Any = MISSING
    loss: Any = MISSING
    optimizer: Any = MISSING


@dataclass
class FromCheckpointSchema:
    """What every command that reads a checkpoint takes."""

    ckpt: str = MISSING
    seed: int = MISSING
    device: str = MISSING
    dataset_root: Optional[str] = MISSING


@dataclass
class SampleSchema(FromCheckpointSchema):
    n: int = MISSING
    interp_rows: int = MISSING
    interp_steps: int = MISSING
    method: str = MISSING
    n_latent: int = MISSING


@dataclass
class EvaluateSchema(FromCheckpointSchema):
    task: str = MISSING
    score: Optional[str] = MISSING
    normal_classes: Optional[list[int]] = MISSING
    n_samples: int = MISSING
    batch_size: int = MISSING
    inception_weights: Optional[str] = MISSING


SCHEMAS = {"train": TrainSchema, "sample": SampleSchema, "evaluate": EvaluateSchema}


def register() -> None:
    """Make the schemas available to the primary configs' defaults lists (``- train_schema``)."""
    cs = ConfigStore.instance()
    for verb, node in SCHEMAS.items():
        cs.store(name=f"{verb}_schema", node=node)


def check_keys(cfg: DictConfig, verb: str) -> None:
    """Hydra lets ``+key=value`` add any key, even to a typed config: refuse the ones nothing reads."""

    def walk(node, schema, prefix):
        fields = {f.name: f.type for f in dataclasses.fields(schema)}
        for key in node:
            if key not in fields:
                raise GenlabError(f"{prefix}{key} is not a setting of genlab {verb} (a typo?); "
                                  f"the settings{' of ' + prefix.rstrip('.') if prefix else ''} are: {', '.join(fields)}.")
            if dataclasses.is_dataclass(fields[key]):
                walk(node[key], fields[key], f"{prefix}{key}.")

    walk(cfg, SCHEMAS[verb], "")
