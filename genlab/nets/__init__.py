"""Plain nn.Modules: generators, discriminators, encoders. They take plain arguments, no config."""

from genlab.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from genlab.nets.mlp import MLPDiscriminator, MLPGenerator
from genlab.nets.classifier import SmallCNN
from genlab.nets.unet import UNet
from genlab.nets.vae import ConvDecoder, ConvEncoder

__all__ = [
    "MLPGenerator",
    "MLPDiscriminator",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "ConvEncoder",
    "ConvDecoder",
    "SmallCNN",
    "UNet",
]
