"""Pictures written during and after training (matplotlib, no screen needed)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """One line per loss column of metrics rows (``step`` on the x axis)."""
    if not rows:
        return
    keys = [k for k in rows[-1] if k.startswith("train/")]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), label=k.removeprefix("train/"), linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
