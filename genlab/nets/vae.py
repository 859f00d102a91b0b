"""The convolutional encoder and decoder of genlab's VAE."""

from torch import Tensor, nn

from genlab.nets.shapes import check_divisible


class ConvEncoder(nn.Module):
    """x [B, C, s, s] -> (mu, logvar), each [B, latent_dim]."""

    def __init__(self, channels: int = 1, image_size: int = 28, latent_dim: int = 16, width: int = 32):
        super().__init__()
        check_divisible("ConvEncoder", channels, image_size, 4)
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, 2 * latent_dim),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """z [B, latent_dim] -> pixel logits [B, C, s, s]; a Sigmoid of them is the image in [0, 1]."""

    def __init__(self, channels: int = 1, image_size: int = 28, latent_dim: int = 16, width: int = 32):
        super().__init__()
        check_divisible("ConvDecoder", channels, image_size, 4)
        self.latent_dim = latent_dim
        self.start = (2 * width, image_size // 4, image_size // 4)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, self.start[0] * self.start[1] * self.start[2]),
            nn.LeakyReLU(0.2),
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.project(z).view(-1, *self.start))
