"""An anomaly score of your own: how far an image's code lies from the prior's centre, the squared norm of its
posterior mean. It asks the model for ``encode`` only, so it fits any model with an encoder (the VAE, the
VAE-GAN). `configs/score/latent_norm.yaml` names it; `genlab evaluate --config-dir configs ckpt=RUN
score=latent_norm` reports it."""

from genlab.scores import Score


class LatentNorm(Score):
    name = "latent_norm"
    needs = ("encode",)

    def __call__(self, model, x):
        mu, _ = model.encode(x)
        return mu.pow(2).sum(1)
