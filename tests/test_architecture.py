"""genlab's structure, read from its source (scripts/architecture.py): each module in a layer, importing its own
layer or those below, no import circle (imports inside functions counted), none tucked into a function outside the
command-line entry, no file over 400 lines and no function over 50; and the checker sees each of those faults."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import architecture  # noqa: E402


def test_genlab_keeps_its_layers():
    assert architecture.problems() == []


def test_the_picture_of_the_layers_is_drawn_from_the_imports(tmp_path):
    architecture.draw(tmp_path / "layers.png")
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    units = [u for _, _, us in architecture.LAYERS for u in us]
    assert len(units) == len(set(units))  # a module in one layer only


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """A package laid out as genlab, with one fault of each kind."""
    pkg = tmp_path / "genlab"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "config.py": "from genlab import build\n",  # a leaf importing the assembly layer above it
        "build.py": "from genlab.parts import x\n",
        "parts.py": "import genlab.sampling\n",
        "sampling.py": "def f():\n    from genlab.parts import y\n",  # a circle, tucked into a function
        "models.py": "import torch\n" + "\n".join(f"x{i} = {i}" for i in range(401)),  # a long file
        "losses.py": "def g():\n" + "".join(f"    a{i} = {i}\n" for i in range(60)),  # a long function
        "mystery.py": "",  # in no layer
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.setattr(architecture, "ROOT", tmp_path)
    monkeypatch.setattr(architecture, "SOURCES", [pkg])
    (tmp_path / "scripts").mkdir()
    return architecture.problems()


def test_the_checker_finds_each_fault(broken):
    found = "\n".join(broken)
    assert "genlab.mystery is in no layer" in found
    assert "genlab.config:1 imports genlab.build, a layer above it" in found
    assert "an import circle: genlab.parts -> genlab.sampling" in found
    assert "genlab.sampling:2 imports genlab.parts inside a function" in found
    assert "genlab/models.py is 402 lines" in found
    assert "genlab/losses.py:1 g is 61 lines" in found
    assert len(broken) == 6
