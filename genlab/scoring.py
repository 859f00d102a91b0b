"""Scoring images with a model's anomaly score (genlab.scores), as `genlab evaluate task=anomaly` and the
in-training ``eval/auroc`` do: a batch at a time, after the score has seen its calibration sample of normal
training images."""

import numpy as np
import torch
from omegaconf import DictConfig

from genlab.images import as_float
from genlab.losses import gaussian_blur
from genlab.parts import test_split
from genlab.scores import OwnScore, Score

CALIBRATION = 2000  # normal training images a score sees before it scores


@torch.inference_mode()
def scores_of(model, images: torch.Tensor, score: Score, batch_size: int, device) -> np.ndarray:
    """``score`` of each of ``images`` (uint8 [N, C, H, W]), ``batch_size`` at a time on ``device``: [N]."""
    return torch.cat([score(model, as_float(b, device)).float().cpu() for b in images.split(batch_size)]).numpy()


def calibration_sample(images: torch.Tensor, n: int = CALIBRATION) -> torch.Tensor:
    """The same ``n`` of ``images`` (normal training images) every time: the sample a score is calibrated on."""
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]]


def needs_calibration(score: Score) -> bool:
    return isinstance(score, OwnScore) or type(score).calibrate is not Score.calibrate


@torch.inference_mode()
def calibrate(score: Score, model, train_cfg: DictConfig, normal: list[int], device, root=None) -> None:
    """Show ``score`` its calibration sample of the normal classes' training images (never test images), where it
    has a scale to learn."""
    if needs_calibration(score):
        train = test_split(train_cfg, root, classes=normal, train=True)
        score.calibrate(model, as_float(calibration_sample(train.images), device))


@torch.inference_mode()
def maps_of(model, images: torch.Tensor, score: Score, batch_size: int, device, sigma: float | None
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """``score`` of each of ``images`` (uint8 [N, C, H, W]) [N], and with ``sigma`` (not None) its anomaly maps
    [N, H, W] (float32), blurred by a Gaussian of ``sigma`` pixels where it is above 0."""
    scores, maps = [], []
    for b in images.split(batch_size):
        x = as_float(b, device)
        if sigma is None:
            scores.append(score(model, x).float().cpu())
        else:
            s, m = score.score_and_map(model, x)
            scores.append(s.float().cpu())
            m = m.float()
            if sigma > 0:
                m = gaussian_blur(m, sigma, radius=max(1, round(3 * sigma)), edge="replicate")
            maps.append(m[:, 0].cpu())
    return torch.cat(scores).numpy(), torch.cat(maps).numpy() if maps else None
