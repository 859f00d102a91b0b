"""Dropout whose mask is cheap to draw on a CPU.

On a CPU, torch's dropout draws one number per element from a generator that runs on one thread;
for the DCGAN discriminator that was 30% of a bf16 training step on 2 cores. Here each 64-bit draw
gives four 16-bit lanes (the top lane has 15 random bits: its sign bit is always 0), so a mask costs
a quarter of the draws. p is honoured to 1/32768 (torch's own dropout for p below 2**-16 or above
1 - 2**-15). On CUDA and other devices, torch's own dropout.
"""

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(shape, p: float, device=None) -> Tensor:
    """A bool mask of ``shape`` that is True with probability ``1 - p``, from the global CPU generator."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # uniform over [0, 2**63)
    lanes = words.view(torch.int16).view(-1, 4)  # little-endian: lanes 0-2 span int16, lane 3 only [0, 2**15)
    low, high = round(-32768 + p * 65536), round(p * 32768)
    threshold = torch.tensor([low, low, low, high], dtype=torch.int16, device=device)
    return (lanes >= threshold).view(-1)[:n].view(shape)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the cheaper mask on the CPU: the same module, state and behaviour in eval."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not 2**-16 <= self.p <= 1 - 2**-15 or x.device.type != "cpu" or sys.byteorder != "little":
            return F.dropout(x, self.p, self.training, self.inplace)
        scale = keep_mask(x.shape, self.p).to(x.dtype).mul_(1 / (1 - self.p))
        return x.mul_(scale) if self.inplace else x * scale
