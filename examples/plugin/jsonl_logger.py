"""A callback of your own: every metrics row as a line of JSON, and how the run ended.

`configs/logger/jsonl.yaml` names it by ``_target_``; `genlab train --config-dir configs logger=jsonl` (or
logger=[jsonl,tensorboard]) adds it to the run. genlab builds it with the run directory and the resolved
config, and the settings its YAML file gives.
"""

import json
from pathlib import Path

from genlab.callbacks import Callback


class JSONLines(Callback):
    def __init__(self, run_dir, config: dict, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename

    def on_log(self, trainer, row):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_fit_end(self, trainer):  # trainer.status: finished, interrupted, diverged or failed
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"status": trainer.status, "step": trainer.step}) + "\n")
