"""The model card of an export, its README.md: what the model is, how it was trained and on what, how well it did,
what it ran on, and how to use each file. Rendered from the run's own files (its checkpoint, overrides, metrics.csv,
evaluations.json and env.json), so that it says only what the run measured."""

from pathlib import Path

from genlab import environment, runs, summary

# the licence or terms of each dataset genlab reads, as their publishers state them
LICENCES = {
    "digits": "scikit-learn's copy of the UCI Optical Recognition of Handwritten Digits data (Alpaydin & Kaynak, "
              "1998), licensed CC BY 4.0 by the UCI Machine Learning Repository.",
    "mnist": "MNIST (LeCun, Cortes & Burges), made available under the terms of CC BY-SA 3.0.",
    "fashion_mnist": "Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017), MIT licence.",
    "cifar10": "CIFAR-10 (Krizhevsky, 2009, \"Learning Multiple Layers of Features from Tiny Images\"): its authors "
               "state no licence; cite the report.",
    "synthetic": "synthetic images genlab draws itself: no third-party data.",
}
MAGNETIC_TILE = ("Magnetic Tile Defect dataset (Huang, Qiu & Yuan, \"Surface defect saliency of magnetic tile\", The "
                 "Visual Computer 36, 2020), published by its authors for use with citation of that paper.")
OWN = "the user's own images: state their source and licence here."


def licence(dataset: dict) -> str:
    name = str(dataset.get("_target_", "")).rsplit(".", 1)[-1]
    if name == "mvtec" and "magnetic_tile" in str(dataset.get("root", "")):
        return MAGNETIC_TILE
    return LICENCES.get(name, OWN)


def render(model, state: dict, source: Path, graphs: list[dict], skipped: dict, settings: dict, grid: str | None) -> str:
    """The card's Markdown. ``graphs``: the exported graphs ({file, what, inputs, parity}); ``skipped``: what could
    not be exported, and why; ``grid``: the file of the samples drawn for the card, if any."""
    cfg, env = state["config"], environment.read(source)
    data = cfg.get("dataset", {})
    name, about = type(model).__name__, str(data.get("_target_", "?")).rsplit(".", 1)[-1]
    classes = f" (classes {', '.join(map(str, data['classes']))})" if data.get("classes") else ""
    params = sum(p.numel() for p in model.parameters())
    lines = [f"# {name} on {about}{classes}", "",
             f"A genlab {name} ({params / 1e6:.2f}M parameters) exported from `{source.resolve()}` at step {state['step']}, "
             f"with the {'moving average of the weights' if state['weights'] == 'ema' else 'trained weights'}.", ""]
    lines += usage(model, graphs, settings)
    lines += training(state, source, data, about, env)
    lines += measured(source, state["step"])
    if grid:
        lines += ["## Samples", "", f"![64 samples from fixed noise (seed 0)]({grid})", ""]
    lines += ["## Environment", "", environment.summary(env) + "." if env else "Not recorded (a run from before "
              "genlab wrote env.json).", ""]
    lines += files_table(graphs, skipped, grid)
    return "\n".join(lines)


def usage(model, graphs: list[dict], settings: dict) -> list[str]:
    lines = ["## Use", "", "```bash", "genlab sample ckpt=THIS_FOLDER" if model.generates else
             "genlab predict ckpt=THIS_FOLDER images=FOLDER_OF_IMAGES", "```", "", "```python",
             "import genlab.api as gl", "model = gl.load(\"THIS_FOLDER\")   # the model, in eval mode"]
    onnx = any(g["file"].endswith(".onnx") for g in graphs)
    lines += (["import onnxruntime"] if onnx else ["import torch"] if graphs else [])
    for g in graphs:
        stem = g["file"].rsplit(".", 1)[0]
        if onnx:
            feed = ", ".join(f"{n!r}: {n}" for n in g["inputs"])
            lines += [f"{stem} = onnxruntime.InferenceSession(\"{g['file']}\")",
                      f"output = {stem}.run(None, {{{feed}}})[0]  # {g['what']} (numpy arrays)"]
        else:
            lines += [f"output = torch.jit.load(\"{g['file']}\")({', '.join(g['inputs'])})  # {g['what']}"]
    lines += ["```", ""]
    if settings:
        lines += [f"The generator graphs sample with {', '.join(f'{k}={v}' for k, v in settings.items())}.", ""]
    return lines


def training(state: dict, source: Path, data: dict, about: str, env: dict | None) -> list[str]:
    overrides = runs.overrides(source)
    t = state["config"].get("trainer", {})
    minutes = state.get("wall_time", 0.0) / 60
    batch = t.get("batch_size", "?") * (t.get("accumulate") or 1) if isinstance(t.get("batch_size"), int) else "?"
    return ["## Training", "", f"- Command: `genlab train {' '.join(overrides)}`".rstrip() + ("" if overrides else
            " (the defaults)"), f"- Data: {about}" + (f" from `{data['root']}`" if data.get("root") else "") + ".",
            f"- Licence of the data: {licence(data)}",
            f"- {state['step']:,} steps ({state.get('epoch', 0)} epochs) of batch {batch}, {minutes:.1f} minutes of "
            f"training, precision {(env or {}).get('precision') or t.get('precision', '?')}, seed {state['config'].get('seed', '?')}.", ""]


def measured(source: Path, step: int) -> list[str]:
    """What was measured on the exported weights (those of step ``step``): genlab evaluate's reports on them, and
    the metrics row of that step in training."""
    rows = [r for r in runs.metrics(source) if r.get("step") == step]
    last = {k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith(("train/", "val/", "eval/"))}
    lines = ["## Metrics", ""]
    for task, (where, report) in sorted(runs.evaluations(source).items()):
        if not report.get("summary") and report.get("step") == step:  # not a report on another checkpoint
            lines.append(f"- genlab evaluate, {summary.report_title(report)}: {summary.headline(report)} "
                         f"(report: `{where}`)")
    if last:
        lines.append(f"- The metrics row of step {step} in training: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    if len(lines) == 2:
        lines.append("Not evaluated: `genlab evaluate ckpt=RUN` measures it, and a new export carries the numbers.")
    return lines + [""]


def files_table(graphs: list[dict], skipped: dict, grid: str | None) -> list[str]:
    lines = ["## Files", "", "| file | what |", "|---|---|",
             "| `model.safetensors` | the weights (safetensors: tensors only, no code runs when read) |",
             "| `config.yaml` | the run's resolved config: `genlab.api.load` builds the model from it |",
             "| `export.json` | what was exported, from which run, and the SHA-256 of every file |"]
    for g in graphs:
        lines.append(f"| `{g['file']}` | {g['what']}; inputs {', '.join(g['inputs'])} (any batch size); largest "
                     f"difference from the model's own outputs {g['parity']:.2g} (fp32, checked on another batch size "
                     "than the one traced) |")
    if grid:
        lines.append(f"| `{grid}` | the samples above |")
    lines.append("")
    for what, why in skipped.items():
        lines.append(f"- Not exported: the {what}, which {why}.")
    return lines + ([""] if skipped else [])
