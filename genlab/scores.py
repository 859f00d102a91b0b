"""Anomaly scores: how unusual each image is, higher for more anomalous, from what a model offers.

A score asks the model for what it needs (``needs``: its methods), never for its class, so it works for any
model that offers them: ``reconstruct(x)`` (an autoencoder's reconstruction in [0, 1]), ``elbo_terms(x)`` (a
VAE's reconstruction error and KL term at the posterior mean, and the reconstruction), ``features(x)`` (a
discriminator's features, the VAE-GAN's), ``discriminate(x)`` (a GAN discriminator's logit) and
``denoise_errors(x, times)`` (a diffusion model's error at chosen noise levels). `genlab evaluate score=NAME`
chooses one by its name in configs/score/; a score of your own is a Score subclass and a YAML file naming it.
"""

import torch
from torch import Tensor

from genlab.config import make, option, options
from genlab.errors import GenlabError
from genlab.losses import feature_error, gaussian_blur, total_variation


class Score:
    """``score(model, x)`` -> [B] for images ``x`` in [0, 1]. ``calibrate(model, x)`` shows it normal training
    images first, where it needs their scale."""

    name = ""  # its name in configs/score/
    needs: tuple[str, ...] = ()
    untraceable: str | None = None  # why `genlab export` cannot make a graph of it, where it cannot

    def fits(self, model) -> bool:
        return all(callable(getattr(model, n, None)) for n in self.needs)

    def calibrate(self, model, x: Tensor) -> None:
        """Normal training images ``x`` in [0, 1]; a score without a scale of its own ignores them."""

    def __call__(self, model, x: Tensor) -> Tensor:
        raise NotImplementedError

    def has_map(self, model) -> bool:
        """Whether the score has a per-pixel form (``map``) for ``model``."""
        return type(self).map is not Score.map

    def score_and_map(self, model, x: Tensor) -> tuple[Tensor, Tensor]:
        """The score [B] and its map [B, 1, H, W] of the same images; a score that is a function of its map
        computes the map once."""
        return self(model, x), self.map(model, x)

    def map(self, model, x: Tensor) -> Tensor:
        """The score's per-pixel form, [B, 1, H, W], higher where the image looks wrong: its anomaly map."""
        raise GenlabError(f"score={name_of(self)} has no per-pixel form (anomaly map); mse, mse_blur, blur_kl, "
                          "corrected and denoise have one, and so do models that make their own (draem).")


class ELBO(Score):
    """The negative ELBO, decoded at the posterior mean."""

    name, needs = "elbo", ("elbo_terms",)

    def __call__(self, model, x):
        recon, kl, _ = model.elbo_terms(x)
        return recon + kl


class Recon(Score):
    """The ELBO's reconstruction term alone: the error under the likelihood the model trained with."""

    name, needs = "recon", ("elbo_terms",)

    def __call__(self, model, x):
        return model.elbo_terms(x)[0]


class MSE(Score):
    """The squared error of the reconstruction, summed over pixels."""

    name, needs = "mse", ("reconstruct",)

    def __call__(self, model, x):
        return self.map(model, x).flatten(1).sum(1)

    def score_and_map(self, model, x):
        m = self.map(model, x)
        return m.flatten(1).sum(1), m

    def map(self, model, x):
        return (model.reconstruct(x) - x.float()).pow(2).sum(1, keepdim=True)


class MSEBlur(Score):
    """The squared error between the image and its reconstruction, both blurred (Gaussian, sigma 1 pixel): it
    forgives the small stroke shifts normal images have, but not a different shape."""

    name, needs = "mse_blur", ("reconstruct",)

    def __call__(self, model, x):
        return self.map(model, x).flatten(1).sum(1)

    def score_and_map(self, model, x):
        m = self.map(model, x)
        return m.flatten(1).sum(1), m

    def map(self, model, x):
        return blurred_error(x, model.reconstruct(x))


def blurred_error(x: Tensor, reconstruction: Tensor) -> Tensor:
    """The squared error between images and their reconstructions, both blurred, summed over channels: [B, 1, H, W]."""
    return ((gaussian_blur(x) - gaussian_blur(reconstruction)) ** 2).sum(1, keepdim=True)


def error_terms(model, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per image, from one pass decoded at the posterior mean: the blurred squared error, the negative ELBO and
    the KL term."""
    recon, kl, reconstruction = model.elbo_terms(x)
    return blurred_error(x, reconstruction).flatten(1).sum(1), recon + kl, kl


class BlurredMap:
    """The per-pixel form of the ELBO-based scores: the blurred error of the reconstruction at the posterior mean."""

    def map(self, model, x):
        return blurred_error(x, model.elbo_terms(x)[2])


class BlurKL(BlurredMap, Score):
    """``mse_blur`` plus the KL term, each divided by its median over normal training images (``calibrate``), so
    that both an odd shape and an odd latent code count."""

    name, needs = "blur_kl", ("elbo_terms",)

    def __init__(self):
        self.scale = None  # the medians of the blurred error and of the KL term

    @torch.no_grad()
    def calibrate(self, model, x):
        blur, _, kl = error_terms(model, x)
        self.scale = (blur.median().clamp(min=1e-8), kl.median().clamp(min=1e-8))

    def __call__(self, model, x):
        if self.scale is None:
            raise GenlabError(f"score={self.name} needs calibrate(normal training images) first.")
        blur, _, kl = error_terms(model, x)
        return blur / self.scale[0] + kl / self.scale[1]


class Corrected(BlurredMap, Score):
    """The logs of ``mse_blur`` and ``elbo`` less what normal training images of the same detail (total variation)
    score, and the log of the KL term less its mean there, each divided by its spread there, summed. A detailed
    image is hard to reconstruct whatever its class (Serra et al., ICLR 2020), and this takes that out. With fewer
    than 10 normal images there is no slope to fit: each term is taken against its mean."""

    name, needs = "corrected", ("elbo_terms",)

    def __init__(self):
        self.coef = self.spread = None  # per term: the fit's slope and offset [2, 3], and its spread [3]

    @staticmethod
    def logs(terms: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        """The terms' logs [B, 3], and what they are fitted on, [log total variation, 1]: [B, 2]. On the CPU in
        float64, which every device can hand over (MPS has no float64)."""
        y = torch.stack(terms, 1).cpu().double().clamp(min=1e-8).log()
        a = torch.stack([total_variation(x).cpu().double().clamp(min=1e-3).log(), torch.ones_like(y[:, 0])], 1)
        return y, a

    @torch.no_grad()
    def calibrate(self, model, x):
        y, a = self.logs(error_terms(model, x), x)
        if len(x) >= 10:
            coef = torch.linalg.lstsq(a, y).solution  # [2, 3]: slope and offset per term
            coef[:, 2] = torch.tensor([0.0, y[:, 2].mean().item()])  # the KL term: its mean only
        else:  # too few images to fit a slope on: each term against its mean
            coef = torch.stack([torch.zeros_like(y[0]), y.mean(0)])
        r = y - a @ coef
        self.coef = coef
        self.spread = (r.std(0) if len(r) > 1 else torch.ones(3, dtype=r.dtype)).clamp(min=1e-3)  # a perfect fit has none

    def __call__(self, model, x):
        if self.coef is None:
            raise GenlabError(f"score={self.name} needs calibrate(normal training images) first.")
        y, a = self.logs(error_terms(model, x), x)
        return ((y - a @ self.coef) / self.spread).sum(1).float().to(x.device)


class Critic(Score):
    """Minus the discriminator's logit: images it finds unreal score high."""

    name, needs = "critic", ("discriminate",)

    def __call__(self, model, x):
        return -model.discriminate(x)


class Denoise(Score):
    """The mean squared error of the model's unconditional prediction at the heavy noise levels ``times``
    (fractions of its path), with seeded noise: a batch always gets the same scores. There the network must
    restore the shape from little of the image, and it restores the shapes it was trained on; light noise
    measures how much ink an image has instead (docs/results.md)."""

    name, needs = "denoise", ("denoise_errors",)
    untraceable = "draws seeded noise on every call, which a traced graph cannot repeat"  # genlab export

    def __init__(self, times: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 0.95)):
        if not times or not all(0 < t <= 1 for t in times):
            raise GenlabError(f"score.times are fractions of the path in (0, 1]; got {list(times)}.")
        self.times = tuple(times)

    def __call__(self, model, x):
        return model.denoise_errors(x, self.times).mean(0)

    def map(self, model, x):
        return model.denoise_errors(x, self.times, per_pixel=True).mean(0)


class Feature(Score):
    """The discriminator's feature error between an image and its reconstruction (the VAE-GAN's own likelihood)."""

    name, needs = "feature", ("reconstruct", "features")

    def __call__(self, model, x):
        h = model.features(torch.cat([x.float(), model.reconstruct(x)]))
        return feature_error(h[:x.shape[0]], h[x.shape[0]:])


class OwnScore(Score):
    """A score a model computes itself (one of its ``scores``, in its own ``anomaly_score``)."""

    def __init__(self, name: str):
        self.name = name

    def fits(self, model):
        return self.name in model.scores

    def calibrate(self, model, x):
        model.calibrate(x)

    def __call__(self, model, x):
        return model.anomaly_score(x, self.name)

    def has_map(self, model):
        return callable(getattr(model, "anomaly_map", None))

    def map(self, model, x):
        if not self.has_map(model):
            return super().map(model, x)
        return model.anomaly_map(x, self.name)

    def score_and_map(self, model, x):
        both = getattr(model, "score_and_map", None)
        return both(x, self.name) if callable(both) else super().score_and_map(model, x)


def score_names(model, own: bool = True) -> list[str]:
    """The scores ``model`` offers: its own (``own``), then genlab's that it offers what they need for, its default
    first."""
    mine = list(model.scores) if own else []
    names = sorted(options("score"), key=lambda n: n != model.default_score)
    return mine + [n for n in names if n not in mine and make(option("score", n), "score").fits(model)]


def score_for(model, choice=None, own: bool = True) -> Score:
    """The score ``choice`` names for ``model``: None (its default), a name (its own, when ``own``, or one of
    configs/score/), a ``_target_`` node (a score of your own) or a Score; refused, with the scores it offers,
    where it does not fit."""
    kind = type(model).__name__
    if choice is None:
        choice = model.default_score or (model.scores[0] if own and model.scores else None)
        if choice is None:
            raise GenlabError(f"{kind} has no anomaly score.")
    if own and isinstance(choice, str) and choice in model.scores:
        return OwnScore(choice)
    if isinstance(choice, Score):
        score = choice
    elif isinstance(choice, str) and choice not in options("score"):
        score = None
    else:
        score = make(option("score", choice) if isinstance(choice, str) else choice, "score")
    name = choice if isinstance(choice, str) else getattr(score, "name", "") or type(score).__name__
    if score is None or not score.fits(model):
        offered = " | ".join(score_names(model, own)) or "none"
        raise GenlabError(f"score={name} is not offered by {kind}: use {offered}.")
    return score


def name_of(score: Score) -> str:
    """A score's name in reports: its ``name``, else its class's."""
    return score.name or type(score).__name__


__all__ = ["Score", "ELBO", "Recon", "MSE", "MSEBlur", "BlurKL", "Corrected", "Critic", "Denoise", "Feature",
           "OwnScore", "score_names", "score_for", "name_of", "error_terms", "blurred_error"]
