"""Batches from a dataset of uint8 tensors: drawn by index on the training device and normalised there."""

import logging
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from genlab.errors import GenlabError
from genlab.images import as_float

log = logging.getLogger(__name__)


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    name: str
    split: dict | None = None  # a folder's train/test split, as its checkpoint records it (genlab.data.split)
    # an inspection dataset's (genlab.data.mvtec) test and validation images also carry:
    masks: torch.Tensor | None = None  # uint8 [N, 1, H, W], 1 on defective pixels (all 0 for a good image)
    mask_known: torch.Tensor | None = None  # bool [N]: whether the image's mask is known (a defect may have none)
    class_names: list[str] | None = None  # the name of each label: "good" is 0, the defect types 1, 2, ...
    paths: list[str] | None = None  # each image's file, relative to the dataset's root

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def subset(data: ImageData, fraction: float) -> ImageData:
    """A share ``fraction`` (in (0, 1]) of ``data``, class by class (each class keeps that share of its images, at
    least one), chosen by a fixed permutation: the same images for every run, seed and process. For data-efficiency
    experiments (dataset.fraction=0.1: 5,000 of CIFAR-10's 50,000)."""
    if not 0 < fraction <= 1:
        raise GenlabError(f"dataset.fraction is the share of the training images kept, in (0, 1]; got {fraction}.")
    if fraction == 1:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    keep = []
    for c in data.labels.unique():
        members = order[data.labels[order] == c]
        keep.append(members[:max(1, round(fraction * len(members)))])
    chosen = torch.cat(keep).sort().values
    return ImageData(data.images[chosen], data.labels[chosen], data.name, data.split)


class Batch(NamedTuple):
    """What a model's ``training_step`` gets: images and their labels (unconditional models ignore them)."""

    x: torch.Tensor  # float images [B, C, H, W] in [0, 1], on the training device
    y: torch.Tensor  # int64 class labels [B], on the same device


class Loader:
    """Batches drawn by index from a uint8 dataset kept on the training device (or, on a GPU it does not fit
    easily, in host memory or memory-mapped, each batch gathered into pinned memory), normalised there a whole
    batch at a time. The order of epoch ``e`` is a
    function of (seed, e) alone, so a run resumed mid-epoch replays it. Incomplete last batches are dropped.

    ``batch_size`` is the batch of one optimisation step over all ``world`` processes: rank ``r`` takes the
    r-th of ``world`` equal slices of each batch, so that the ranks together see what one process would."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device="cpu", seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.device = torch.device(device)
        self.n = images.shape[0]
        if self.n == 0:
            raise GenlabError("the training split has no images.")
        if batch_size % world:
            raise GenlabError(f"trainer.batch_size={batch_size} is the batch of each step over all {world} processes, "
                              f"so it must be a multiple of {world}; e.g. trainer.batch_size={batch_size // world * world or world}.")
        if batch_size > self.n:
            log.warning("trainer.batch_size=%d is more than the %d training images; using %d", batch_size, self.n,
                        self.n // world * world)
        self.batch_size = min(batch_size, self.n // world * world)
        if self.batch_size == 0:
            raise GenlabError(f"the training split has {self.n} images, fewer than the {world} processes.")
        self.steps_per_epoch = self.n // self.batch_size
        self.seed, self.rank, self.local = seed, rank, self.batch_size // world
        self.images = self._place(images)
        self.labels = labels.to(self.images.device)  # where the images are: both are indexed by one order

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return images.to(self.device) if images.numel() < free // 4 else images
        return images.to(self.device)

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).to(self.images.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's share of the batches of ``epoch``, from its ``start``-th on."""
        order = self.order(epoch)
        for i in range(start, self.steps_per_epoch):
            lo = i * self.batch_size + self.rank * self.local
            idx = order[lo:lo + self.local]
            yield Batch(as_float(self._gather(self.images, idx)), self._gather(self.labels, idx))

    def _gather(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of ``t`` on the training device. From pinned host memory (a dataset the GPU cannot hold)
        the rows are gathered into a pinned buffer, so that the copy to the GPU runs beside the computation
        (``index_select`` alone would return pageable memory, and the copy would wait)."""
        if t.device == self.device:
            return t.index_select(0, idx)
        rows = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return torch.index_select(t, 0, idx, out=rows).to(self.device, non_blocking=True)
