"""Plain nn.Modules: generators, discriminators, encoders. They take plain arguments, no config."""

from genlab.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from genlab.nets.dcgan64 import DCGAN64Discriminator, DCGAN64Generator
from genlab.nets.mlp import MLPDiscriminator, MLPGenerator
from genlab.nets.stylegan import StyleGANDiscriminator, StyleGANGenerator
from genlab.nets.classifier import ResNetClassifier, SmallCNN
from genlab.nets.unet import UNet
from genlab.nets.vae import ConvDecoder, ConvEncoder

__all__ = [
    "MLPGenerator",
    "MLPDiscriminator",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "DCGAN64Generator",
    "DCGAN64Discriminator",
    "StyleGANGenerator",
    "StyleGANDiscriminator",
    "ConvEncoder",
    "ConvDecoder",
    "SmallCNN",
    "ResNetClassifier",
    "UNet",
]
