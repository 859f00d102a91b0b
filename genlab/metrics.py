"""Generation-quality metrics on feature vectors and class probabilities (pure functions).

``real`` and ``fake`` are feature matrices [N, D] (float64 is used inside); ``probs`` are
class probabilities [N, K].
"""

import torch
from torch import Tensor


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrt_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def fid(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    mu1, s1 = _mean_cov(real)
    mu2, s2 = _mean_cov(fake)
    r = _sqrt_psd(s1)
    trace_sqrt = torch.linalg.eigvalsh(r @ s2 @ r).clamp(min=0).sqrt().sum()  # Tr sqrt(S1 S2)
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def kid(real: Tensor, fake: Tensor, subsets: int = 20, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial
    kernel, averaged over random subsets; returns (mean, std)."""
    g = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    m = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]]
        y = fake[torch.randperm(len(fake), generator=g)[:m]]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3), ((y @ y.T / d + 1) ** 3), ((x @ y.T / d + 1) ** 3)
        mmd = (kxx.sum() - kxx.diag().sum() + kyy.sum() - kyy.diag().sum()) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(float(mmd))
    t = torch.tensor(values)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    radii = [torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values for chunk in x.split(2048)]
    return torch.cat(radii)


def _covered(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """For each point: is it inside the k-NN ball of some centre?"""
    inside = [(torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in points.split(2048)]
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour manifolds."""
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _knn_radii(real, k)).float().mean()
    recall = _covered(real, fake, _knn_radii(fake, k)).float().mean()
    return float(precision), float(recall)


def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """exp E_x KL(p(y|x) || p(y)) over ``splits`` chunks (Salimans et al. 2016); (mean, std)."""
    probs = probs.double().clamp(min=1e-12)
    scores = []
    for p in probs.chunk(splits):
        py = p.mean(0, keepdim=True)
        scores.append(float((p * (p.log() - py.log())).sum(1).mean().exp()))
    t = torch.tensor(scores)
    return float(t.mean()), float(t.std()) if len(scores) > 1 else 0.0


def class_coverage(probs: Tensor, min_share: float = 0.01) -> tuple[int, list[int]]:
    """How many classes the samples hit (each with at least ``min_share`` of them), and the histogram
    of predicted classes: the mode-collapse check."""
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1])
    return int((counts >= max(1, min_share * len(probs))).sum()), counts.tolist()
