"""genlab's layers, read from its own imports: the rules they keep, and a picture of them.

Each module of genlab belongs to one layer (LAYERS, top to bottom). A module imports modules of its own layer or of
the layers below it, never above, and the imports form no circle: with the imports inside functions counted, so
that none is tucked into a function to dodge one. Only the command-line entry imports genlab lazily (for a fast
`genlab --help`). No file of genlab is over 400 lines, and no function of genlab or scripts/ over 50.

    python scripts/architecture.py            # check, and draw docs/images/architecture.png
    python scripts/architecture.py --check    # check only (tests/test_architecture.py runs these checks)
"""

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "genlab", ROOT / "hydra_plugins" / "genlab_optuna_sweeper"]  # genlab, and its Optuna sweeper

# (layer, what it holds, its units: a module of genlab or a sub-package), from the top down
LAYERS = [
    ("entry", "the command line, its Optuna sweeper and the Python API", ["cli", "optuna_sweeper", "api", "__main__"]),
    ("commands", "one task each", ["train", "sample", "evaluate", "anomaly", "inspection", "predict", "quality", "report",
                                   "export", "card"]),
    ("assembly", "a training run from its config", ["build"]),
    ("writers and measures", "what a run writes and measures", ["callbacks", "trackers", "measures"]),
    ("services", "build a part, draw samples, score images, the yardstick", ["parts", "sampling", "scoring", "graphs",
                                                                              "classifier"]),
    ("parts", "the loop, the step API, the models and what they are made of",
     ["trainer", "step", "models", "samplers", "scores", "augment", "regularizers", "losses", "nets", "data",
      "schedules", "ema"]),
    ("leaves", "config, files, devices, processes, pictures, tables",
     ["config", "schema", "checkpoint", "runs", "device", "dist", "images", "plots", "metrics", "detection", "summary",
      "search", "sweep", "inception", "errors", "environment", "bundle", "__init__"]),
]
# units that may import genlab inside functions: the command-line entry and the sweeper Hydra loads with it, for a
# fast --help (the sweeper draws its trials.png with genlab.plots, which costs matplotlib's import)
LAZY = {"cli", "optuna_sweeper"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 50


@dataclass(frozen=True)
class Import:
    source: str  # dotted module names
    target: str
    line: int
    lazy: bool  # inside a function


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for source in SOURCES for p in sorted(source.rglob("*.py"))}


def unit(module: str) -> str:
    """The layer unit of a module: genlab.models.gan -> models; genlab -> __init__; the sweeper's package."""
    parts = module.split(".")
    if parts[0] != "genlab":  # hydra_plugins.genlab_optuna_sweeper and its module
        return "optuna_sweeper"
    return parts[1] if len(parts) > 1 else "__init__"


def resolve(name: str, known: dict) -> str | None:
    """The module of genlab's an imported name is, or its nearest package (``from genlab import x`` where x is no
    module names genlab itself); None for any other package's."""
    if not any(name == m or name.startswith(m + ".") for m in ("genlab", "hydra_plugins.genlab_optuna_sweeper")):
        return None
    while name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: Path, known: dict) -> list[Import]:
    source = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, lazy: bool):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package this module is in
                    package = source.split(".")[: len(source.split(".")) - child.level + (path.name == "__init__.py")]
                    base = ".".join(package + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in child.names] or [base]
            else:
                visit(child, inner)
                continue
            for n in names:
                target = resolve(n, known)
                if target is not None and target != source:
                    found.append(Import(source, target, child.lineno, lazy))
    visit(tree, False)
    return found


def import_graph() -> list[Import]:
    known = modules()
    return [i for p in known.values() for i in imports_of(p, known)]


def layer_of() -> dict[str, int]:
    """unit -> its layer's index, 0 the bottom."""
    return {u: len(LAYERS) - 1 - i for i, (_, _, units) in enumerate(LAYERS) for u in units}


def cycles(edges: list[Import]) -> list[list[str]]:
    """The circles among modules (one per strongly connected component of more than one module)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def long_functions(paths) -> list[str]:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} is {n} lines (at most {MAX_FUNCTION_LINES})")
    return out


def problems() -> list[str]:
    """Every broken rule, one line each; empty when the code keeps them all."""
    edges, layers, known = import_graph(), layer_of(), modules()
    out = [f"{m} is in no layer of scripts/architecture.py's LAYERS" for m in known if unit(m) not in layers]
    out += ["an import circle: " + " -> ".join(c) for c in cycles(edges)]
    for e in edges:
        s, t = unit(e.source), unit(e.target)
        if s in layers and t in layers and layers[t] > layers[s]:
            out.append(f"{e.source}:{e.line} imports {e.target}, a layer above it")
        if e.lazy and s not in LAZY:
            out.append(f"{e.source}:{e.line} imports {e.target} inside a function")
    out += [f"{p.relative_to(ROOT)} is {n} lines (at most {MAX_FILE_LINES})" for m, p in known.items()
            if m.startswith("genlab") and (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    out += long_functions([*known.values(), *sorted((ROOT / "scripts").rglob("*.py"))])
    return out


def draw(path: Path) -> None:
    """The layers as rows of their units, top to bottom, and each import between units above the leaves as an
    arrow: grey down to a lower layer, blue within a layer. Nearly everything imports the leaves, so instead of
    their arrows each leaf says how many units import it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    pairs = {(unit(e.source), unit(e.target)) for e in import_graph() if unit(e.source) != unit(e.target)}
    leaves = set(LAYERS[-1][2])
    width, row = 16.0, 1.35
    fig, ax = plt.subplots(figsize=(14, 8.6))
    where = {}
    for i, (name, about, units) in enumerate(LAYERS):
        y = -i * row
        ax.add_patch(FancyBboxPatch((-0.1, y - 0.45), width + 0.2, 0.9, boxstyle="round,pad=0.02",
                                    fc="#f3f6fa", ec="#c5d0dc", lw=0.8, zorder=0))
        ax.text(-0.3, y + 0.12, name, ha="right", va="center", fontsize=10, weight="bold")
        ax.text(-0.3, y - 0.16, about, ha="right", va="center", fontsize=7, color="#555")
        step = width / len(units)
        for j, u in enumerate(units):
            x = step * (j + 0.5)
            where[u] = (x, y)
            ax.text(x, y + (0.08 if u in leaves else 0), u, ha="center", va="center", fontsize=8.5, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="#4a6fa5", lw=0.9))
            if u in leaves:
                users = sum(1 for s, t in pairs if t == u)
                ax.text(x, y - 0.28, f"{users} import it", ha="center", va="center", fontsize=6.5, color="#555")
    for s, t in sorted(pairs):
        if t in leaves:
            continue
        (x0, y0), (x1, y1) = where[s], where[t]
        same = y0 == y1
        bend = -min(0.35, 0.8 / abs(x1 - x0)) if same else 0.0  # a long arc within a row stays near the row
        ax.annotate("", (x1, y1 + (0.2 if not same else 0.16)), (x0, y0 - (0.2 if not same else -0.16)),
                    arrowprops=dict(arrowstyle="-|>", lw=0.7, alpha=0.75 if same else 0.45, shrinkA=4, shrinkB=4,
                                    color="#2b6cb0" if same else "#555", connectionstyle=f"arc3,rad={bend}"), zorder=1)
    ax.set_xlim(-4.4, width + 0.3)
    ax.set_ylim(-(len(LAYERS) - 1) * row - 0.7, 0.9)
    ax.axis("off")
    ax.set_title("genlab's layers, from its imports (scripts/architecture.py): a module imports its own layer or "
                 "those below, and no circle forms", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="check only; draw nothing")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "architecture.png")
    args = p.parse_args(argv)
    found = problems()
    for line in found:
        print(line)
    if not args.check:
        draw(args.out)
        print(f"wrote {args.out}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
