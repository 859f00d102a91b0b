"""An export folder (genlab export): a model's weights as safetensors, its run's config, and ``export.json``, a
manifest with what was exported and a checksum of every file, read back as a checkpoint's state.

safetensors holds tensors and nothing else (no code runs when it is read) and is read by diffusers, timm and any
safetensors reader; the manifest's SHA-256 of each file finds a byte changed on disk or a file cut short, which a
reader of the weights alone would not notice.
"""

import hashlib
import json
import os
from pathlib import Path

import yaml

from genlab.errors import Damaged, GenlabError, first_line

MANIFEST, WEIGHTS, CONFIG = "export.json", "model.safetensors", "config.yaml"
FORMAT, VERSION = "genlab-export", 1


def is_export(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def save_weights(state_dict: dict, path: Path) -> None:
    """The tensors of ``state_dict`` as safetensors (each its own contiguous copy: safetensors refuses shared memory)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt", "producer": "genlab"})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, about: dict, files: list[str]) -> dict:
    """``export.json``: ``about`` (what was exported, from which run) and each of ``files`` with its SHA-256."""
    folder = Path(folder)
    manifest = {"format": FORMAT, "version": VERSION, **about, "files": {f: sha256(folder / f) for f in files}}
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)
    return manifest


def verify(folder: Path) -> dict:
    """The manifest, once every file it lists is there and matches its checksum; else Damaged, naming the file."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise Damaged(f"{folder / MANIFEST} cannot be read: {first_line(e)}. Export the run again.") from e
    if manifest.get("format") != FORMAT:
        raise Damaged(f"{folder / MANIFEST} is not a genlab export's manifest.")
    if manifest.get("version", 0) > VERSION:
        raise GenlabError(f"{folder} is a version {manifest['version']} export; this genlab reads up to version "
                          f"{VERSION}. Upgrade genlab.")
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise Damaged(f"the export {folder} is missing {name}. Export the run again.")
        if sha256(path) != expected:
            raise Damaged(f"the export {folder} is damaged: {name} no longer matches the checksum written with it "
                          "(changed or cut short since it was exported). Export the run again.")
    return manifest


def read_state(folder: Path) -> dict:
    """An export as a checkpoint's state: its config, its weights as ``model`` (``exported``: "ema" or "raw", the
    weights that were exported), the step and time it had trained."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = verify(folder)
    try:
        weights = load_file(str(folder / WEIGHTS))
        config = yaml.safe_load((folder / CONFIG).read_text())
    except Exception as e:  # checked above: only a file changed between the check and the read gets here
        raise Damaged(f"the export {folder} cannot be read: {first_line(e)}") from e
    return {"format": FORMAT, "config": config, "choices": manifest.get("choices"), "model": weights, "ema": None,
            "step": manifest.get("step", 0), "epoch": manifest.get("epoch", 0),
            "wall_time": manifest.get("wall_time", 0.0), "processes": 1, "exported": manifest.get("weights", "raw")}
