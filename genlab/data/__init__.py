"""Datasets as tensors: each is decoded once into uint8 images [N, C, H, W] and int64 labels [N].

Every dataset is named by a ``dataset/*.yaml`` config (``_target_: genlab.data.mnist``) and takes ``train``
(which split) plus the config's plain arguments (genlab.data.datasets). Normalisation to floats happens later,
on the training device, a whole batch at a time (genlab.data.loader).

The datasets read from files are decoded once into genlab's cache (genlab.data.cache): a file of raw uint8
images that every later run, and every process of a run, reads. A dataset that fits comfortably in memory is
read into it; a larger one is memory-mapped and read by index a batch at a time, so that a process's own memory
stays flat however large the dataset (``in_memory``). A folder of image files is decoded by several processes
(genlab.data.decode), and split into training and test images by each file's name (genlab.data.split). An
inspection dataset in MVTec AD's layout (genlab.data.mvtec) also carries its defects' masks.
"""

from genlab.data.cache import Cache, cache_dir, fits_in_memory
from genlab.data.datasets import cifar10, digits, fashion_mnist, folder, mnist, synthetic
from genlab.data.loader import Batch, ImageData, Loader, subset
from genlab.data import mvtec  # the module: its reader genlab.data.mvtec.mvtec is dataset=mvtec's _target_

__all__ = ["Batch", "ImageData", "Loader", "subset", "Cache", "cache_dir", "fits_in_memory", "cifar10", "digits",
           "fashion_mnist", "folder", "mnist", "mvtec", "synthetic"]
