"""A model's generator and anomaly scorer as standalone graphs, TorchScript or ONNX, for `genlab export`: each traced
on example inputs, saved, loaded back and run on other inputs (another batch size), and its outputs compared with
the model's own (``parity``: the largest difference, fp32; relative to the largest output where that is above 1).

The generator maps latents (and labels, for a class-conditional model) to images in [0, 1] with the sampling settings
given (a diffusion model's sampler and steps are unrolled into the graph, so fewer steps make a smaller graph); the
scorer maps images in [0, 1] to anomaly scores, with its calibration (a VAE's ``corrected``) taken in as constants.
What does not trace (an operation the exporter lacks, noise drawn inside the sampler) is said, not hidden.
"""

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from genlab.errors import GenlabError, first_line
from genlab.models.base import balanced_labels

log = logging.getLogger(__name__)

SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
PARITY = 1e-5  # the largest difference from the model's own outputs (relative, above 1) an exported graph is kept with


class Generator(nn.Module):
    """``model.generate`` with fixed sampling ``settings``: latents [B, ...] (and labels [B]) -> images in [0, 1]."""

    def __init__(self, model, settings: dict):
        super().__init__()
        self.model, self.settings = model, dict(settings)

    def forward(self, z, labels=None):
        return self.model.generate(z, labels, **self.settings).float()


class Scorer(nn.Module):
    """An anomaly score as a module: images [B, C, H, W] in [0, 1] -> scores [B], higher for more anomalous."""

    def __init__(self, model, score):
        super().__init__()
        self.model, self.score = model, score

    def forward(self, x):
        return self.score(self.model, x).float()


def generator_inputs(model, n: int, seed: int) -> tuple:
    z = model.latent(n, torch.Generator().manual_seed(seed))
    labels = balanced_labels(n, model.num_classes)
    return (z,) if labels is None else (z, labels)


def scorer_inputs(model, shape: tuple, n: int, seed: int) -> tuple:
    return (torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)),)


def export_graph(module: nn.Module, make_inputs, names: list[str], form: str, path: Path) -> dict:
    """Trace ``module`` on ``make_inputs(4, seed 0)`` into ``path`` (TorchScript or ONNX), load it back, and compare it
    with the module on ``make_inputs(3, seed 1)``. Returns {file, inputs, parity}; raises GenlabError where it does not
    trace or does not match."""
    example, check = make_inputs(4, 0), make_inputs(3, 1)
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values taken in as constants
            module(*example)  # once as it is: what a sampler computes once and keeps (its steps) is then a constant
            (save_torchscript if form == "torchscript" else save_onnx)(module, example, names, path)
            got = run_saved(path, form, check, names)
            want = module(*check)
    except Exception as e:
        path.unlink(missing_ok=True)
        raise GenlabError(f"does not export to {form}: {reason(e)}") from e
    diff = float((got - want).abs().max() / want.abs().max().clamp(min=1))  # relative to scores above 1
    if not diff <= PARITY:
        path.unlink(missing_ok=True)
        raise GenlabError(f"its {form} graph differs from the model by up to {diff:.3g} (more than {PARITY:g}): it "
                          "draws noise inside, or an operation traced for one batch size only")
    return {"file": path.name, "inputs": names, "parity": diff}


def save_torchscript(module, example: tuple, names, path: Path) -> None:
    torch.jit.trace(module, example, check_trace=False).save(str(path))


def save_onnx(module, example: tuple, names, path: Path) -> None:
    """torch.export's ONNX exporter, with the batch dimension left free; its progress lines and the ONNX optimizer's
    notes go to the debug log."""
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in example)
    said = io.StringIO()
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            torch.onnx.export(module, example, str(path), input_names=names, output_names=["output"],
                              dynamic_shapes=shapes, dynamo=True, verbose=False, external_data=False)  # one file
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        log.debug("%s", said.getvalue())


def run_saved(path: Path, form: str, inputs: tuple, names: list[str]) -> torch.Tensor:
    """An exported graph's output on ``inputs``, as its user would run it: torch.jit.load, or onnxruntime on the CPU."""
    if form == "torchscript":
        return torch.jit.load(str(path))(*inputs)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def check_onnx_installed() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise GenlabError(f"format=onnx needs onnx, onnxscript and onnxruntime, and {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'genlab[export]'")


def reason(error: BaseException) -> str:
    """Why an exporter failed, in one line: the TorchScript interpreter's and torch.export's own cause (the last line
    naming an error) rather than their headline, without terminal colours."""
    while error.__cause__ is not None and "Next steps" in str(error):  # torch.onnx's wrapper: its cause says why
        error = error.__cause__
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (named[-1] if named else first_line(error))[:300]
