"""GenerativeModel subclasses: how each model trains, samples and scores."""

from genlab.models.base import GenerativeModel
from genlab.models.diffusion import DDPM, FlowMatching
from genlab.models.draem import DRAEM
from genlab.models.edm import EDM
from genlab.models.gan import GAN
from genlab.models.stylegan import StyleGAN
from genlab.models.vae import VAE, Autoencoder
from genlab.models.vae_gan import VAEGAN

__all__ = ["DRAEM", "GenerativeModel", "Autoencoder", "GAN", "StyleGAN", "VAE", "DDPM", "EDM", "FlowMatching", "VAEGAN"]
