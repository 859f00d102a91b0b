"""A GAN augmentation of your own: each image mirrored left to right with probability ``p``, applied to real and
fake images alike before the discriminator sees them. `configs/augment/flip.yaml` names it; `genlab train
--config-dir configs model=dcgan augment=flip` trains with it."""

import torch


class Flip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x):  # images in [-1, 1], [B, C, H, W]; torch's generator is seeded by the loop each step
        flip = torch.rand(len(x), device=x.device) < self.p
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
