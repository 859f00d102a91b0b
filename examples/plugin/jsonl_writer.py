"""A writer of your own: every metrics row as a line of JSON, and how the run ended.

`configs/callbacks/jsonl.yaml` names it by ``_target_``; `genlab train --config-dir configs callbacks=[default,jsonl]`
adds it to genlab's writers (``callbacks=jsonl``: it alone). genlab builds it with the settings its YAML file gives,
and with the run directory because its constructor asks for ``run_dir`` (it may also ask for ``config``, the
run's resolved config).
"""

import json
from pathlib import Path

from genlab.callbacks import Callback


class JSONLines(Callback):
    def __init__(self, run_dir, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename

    def on_log(self, trainer, row):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_fit_end(self, trainer):  # trainer.status: finished, interrupted, diverged or failed
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"status": trainer.status, "step": trainer.step}) + "\n")
