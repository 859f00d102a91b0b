"""Pictures written during and after training (matplotlib, no screen needed)."""

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from genlab.errors import GenlabError  # noqa: E402


def loss_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """One line per loss column of metrics rows (``step`` on the x axis); below them the learning rates when
    a schedule set them (``lr/NAME`` columns)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("train/")))  # a row may lack some
    rates = list(dict.fromkeys(k for r in rows for k in r if k.startswith("lr/")))
    if rates:
        fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=110, sharex=True, height_ratios=[3, 1])
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), label=k.removeprefix("train/"), linewidth=1.2)
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    if rates:
        for k in rates:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) not in (None, "")]
            lr_ax.plot(*zip(*pts), label=k.removeprefix("lr/"), linewidth=1.2)
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(alpha=0.3)
        lr_ax.legend(fontsize=8)
        ax = lr_ax
    ax.set_xlabel("step")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def latent_map(points, labels, path: Path, method: str = "pca", title: str = "") -> None:
    """A 2-D map of latent vectors [N, D] (PCA or t-SNE), one colour per class label."""
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=0).fit_transform(points) if points.shape[1] > 2 else points
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30, len(points) - 1)).fit_transform(points)
    else:
        raise GenlabError(f"method={method} is not a latent-map method: use pca or tsne.")
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(np.unique(labels)):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(i % 10), label=str(c))
    ax.legend(title="class", markerscale=3, fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def traversal(images, row_labels: list[str], values: list[float], path: Path, title: str = "") -> None:
    """A latent traversal: images [rows, cols, C, H, W] in [0, 1], one latent dimension a row (named by
    ``row_labels``), the offsets ``values`` along the columns."""
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(0.75 * cols + 1.2, 0.75 * rows + 0.6), dpi=110, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            image = images[r, c].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
            if r == rows - 1:
                ax.set_xlabel(f"{round(values[c], 1) + 0.0:+.1f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=0.1, w_pad=0.1, rect=(0, 0, 1, 0.97 if title else 1))
    fig.savefig(path)
    plt.close(fig)


def roc(fpr, tpr, auroc: float, path: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.plot(fpr, tpr, linewidth=1.6, label=f"AUROC = {auroc:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def class_histogram(samples: list[int], reference: list[int], path: Path, title: str = "") -> None:
    """Share of each predicted class among the samples and among real images: mode collapse shows."""
    k = np.arange(len(samples))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.bar(k - 0.2, np.array(samples) / max(1, sum(samples)), width=0.4, label="samples")
    ax.bar(k + 0.2, np.array(reference) / max(1, sum(reference)), width=0.4, label="real (test split)")
    ax.set_xticks(k)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("share")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep(values: dict[str, list[float]], metric: str, path: Path, title: str = "") -> None:
    """One column per setting of a sweep: a dot per run, and the mean ± sample standard deviation
    where a setting has several runs (seeds). Settings that all set one key show its values."""
    names = list(values)
    keys = {n.split("=", 1)[0] for n in names}
    one_key = len(keys) == 1 and all("=" in n and " " not in n for n in names)
    ticks = [n.split("=", 1)[1] for n in names] if one_key else names
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4), dpi=110)
    for i, name in enumerate(names):
        v = values[name]
        offsets = [0.0] if len(v) == 1 else [0.16 * (j / (len(v) - 1) - 0.5) for j in range(len(v))]
        ax.scatter([i + o for o in offsets], v, s=18, color="tab:blue", alpha=0.8, zorder=3,
                   label=None if i else "a run")
        if len(v) > 1:
            ax.errorbar(i + 0.22, statistics.fmean(v), yerr=statistics.stdev(v), fmt="o", color="tab:red",
                        capsize=4, zorder=4, label=None if "mean ± std" in ax.get_legend_handles_labels()[1]
                        else "mean ± std")
    ax.set_xticks(range(len(names)), ticks, rotation=0 if one_key or len(names) < 4 else 30,
                  ha="center" if one_key or len(names) < 4 else "right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel(keys.pop() if one_key else "setting")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def trials(rows: list[tuple[int, str, float | None]], objective: str, direction: str, path: Path,
           title: str = "") -> str:
    """A hyperparameter search: the objective of each trial, ``rows`` of (number, state, value), with pruned
    trials at the last value they reported, and the best of the completed trials so far. The axis is logarithmic
    where the values span more than two orders of magnitude (one diverged trial would flatten the others into a
    line); returns the axis's scale."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    scale = value_scale([v for _, _, v in rows])
    if scale == "symlog":
        finite = np.abs([v for _, _, v in rows if v is not None and np.isfinite(v)])
        ax.set_yscale("symlog", linthresh=float(np.median(finite)) or 1.0)
    else:
        ax.set_yscale(scale)
    for state, marker, label in (("COMPLETE", "o", "complete"), ("PRUNED", "x", "pruned: its last value")):
        pts = [(n, v) for n, s, v in rows if s == state and v is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=24, zorder=3, label=label)
    best, steps = None, []
    for n, s, v in sorted(rows):
        if s == "COMPLETE" and v is not None:
            best = v if best is None else (min if direction == "minimize" else max)(best, v)
            steps.append((n, best))
    if steps:
        ax.step(*zip(*steps), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"{objective} ({direction}{', log scale' if scale != 'linear' else ''})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if steps or any(s == "PRUNED" and v is not None for _, s, v in rows):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    scale = ax.get_yscale()
    plt.close(fig)
    return scale


def value_scale(values) -> str:
    """linear, or log where positive values span more than 100x, or symlog where values of both signs span more than
    100x their typical size."""
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(finite) < 2:
        return "linear"
    if finite.min() > 0:
        return "log" if finite.max() / finite.min() > 100 else "linear"
    typical = np.median(np.abs(finite))
    return "symlog" if typical > 0 and np.abs(finite).max() / typical > 100 else "linear"


def overlays(images, maps, masks, titles: list[str], span: list[float], path: Path, title: str = "") -> None:
    """One row per image (uint8 [N, C, H, W]): the image, its anomaly map (one colour scale, ``span``, for every
    row) and the map over the image with the defect mask's outline in white, where there is one."""
    n = len(images)
    if not n:
        return
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.4 * n + 0.5), dpi=100, squeeze=False)
    for row, (img, m, mask, name) in enumerate(zip(images, maps, masks, titles)):
        pic = img.transpose(1, 2, 0).squeeze(-1)
        grey = {"cmap": "gray", "vmin": 0, "vmax": 255} if pic.ndim == 2 else {}
        axes[row, 0].imshow(pic, **grey)
        axes[row, 0].set_ylabel(name, fontsize=7)
        shown = axes[row, 1].imshow(m, cmap="inferno", vmin=span[0], vmax=span[1])
        axes[row, 2].imshow(pic, **grey)
        axes[row, 2].imshow(m, cmap="inferno", vmin=span[0], vmax=span[1], alpha=0.5)
        if mask.any():
            axes[row, 2].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        fig.colorbar(shown, ax=axes[row, 1], fraction=0.046, pad=0.02)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, head in zip(axes[0], ("image", "anomaly map", "map, defect outlined")):
        ax.set_title(head, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def heat_overlay(image, m, span: list[float]):
    """An image (uint8 [C, H, W]) with its anomaly map (float [H, W]) blended over it in colour, scaled by
    ``span``: uint8 [H, W, 3], for `genlab predict`'s map PNGs."""
    rgb = np.repeat(image, 3, 0) if image.shape[0] == 1 else image
    level = np.clip((m - span[0]) / max(span[1] - span[0], 1e-12), 0, 1)
    heat = matplotlib.colormaps["inferno"](level)[..., :3] * 255
    return (0.5 * rgb.transpose(1, 2, 0) + 0.5 * heat).round().astype("uint8")
