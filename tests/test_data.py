"""Datasets become uint8 tensors with labels, from the files each format really has."""

import numpy as np
import pytest
import torch

from genlab import data
from genlab.errors import GenlabError

from conftest import SHARED_DATA, fake_images, write_idx


def test_digits_is_offline_and_split():
    train, test = data.digits(train=True), data.digits(train=False)
    assert train.images.shape == (1437, 1, 28, 28) and test.images.shape == (360, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.images.max() > 200
    assert set(train.labels.tolist()) == set(range(10))


def test_mnist_reads_idx_files(tmp_path):
    images, labels = fake_images(12, 28, 28)
    write_idx(tmp_path / "MNIST" / "raw", "train", images, labels)
    write_idx(tmp_path / "MNIST" / "raw", "t10k", *fake_images(5, 28, 28, seed=1))
    d = data.mnist(tmp_path, train=True, download=False)
    assert torch.equal(d.images[:, 0], torch.from_numpy(images))
    assert torch.equal(d.labels, torch.from_numpy(labels).long())
    assert len(data.mnist(tmp_path, train=False, download=False)) == 5


def test_decoded_once_then_cached(tmp_path, monkeypatch):
    write_idx(tmp_path / "MNIST" / "raw", "train", *fake_images(12, 28, 28))
    first = data.mnist(tmp_path, train=True, download=False)
    import torchvision.datasets.mnist as tv_mnist

    monkeypatch.setattr(tv_mnist, "read_image_file", lambda path: pytest.fail("decoded twice"))
    second = data.mnist(tmp_path, train=True, download=False)
    assert torch.equal(first.images, second.images)


def test_classes_keeps_only_those_labels(fake_root):
    d = data.fashion_mnist(fake_root, download=False, classes=[3, 5])
    assert set(d.labels.tolist()) <= {3, 5} and len(d) > 0


def test_classes_that_select_nothing(fake_root):
    with pytest.raises(GenlabError, match=r"selects no training image"):
        data.mnist(fake_root, download=False, classes=[42])


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(GenlabError) as e:
        data.mnist(tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg and "dataset.root" in msg


def test_cifar10_reads_python_batches(fake_root):
    d = data.cifar10(fake_root, train=True, download=False)
    assert d.images.shape == (100, 3, 32, 32)
    grey = data.cifar10(fake_root, train=False, download=False, channels=1, image_size=28)
    assert grey.images.shape == (20, 1, 28, 28)


def test_folder_reads_classes_and_skips_unreadable(tmp_path, caplog):
    from PIL import Image

    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (50, 40), colour).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not an image")
    d = data.folder(tmp_path, train=True, image_size=16, test_fraction=0.0)
    assert d.images.shape == (10, 3, 16, 16)
    assert sorted(d.labels.tolist()) == [0] * 5 + [1] * 5
    red = d.images[d.labels == 0][:, 0]
    assert (red == 255).all()
    assert "skipped 1 unreadable" in caplog.text


def test_folder_with_images_beside_class_folders_is_refused(tmp_path):
    from PIL import Image

    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "stray.png")  # no class: it would have been taken for a cat
    with pytest.raises(GenlabError, match="1 image.* at its top level .*stray.png.* beside the class sub-folders cats"):
        data.folder(tmp_path, image_size=8)


def test_folder_is_decoded_once_per_size(tmp_path, monkeypatch):
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (30, 20), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    first = data.folder(tmp_path, image_size=8)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded twice"))
    assert torch.equal(first.images, data.folder(tmp_path, image_size=8).images)
    with pytest.raises(pytest.fail.Exception, match="decoded twice"):  # another size is another decoding
        data.folder(tmp_path, image_size=16)


def test_folder_without_images(tmp_path):
    with pytest.raises(GenlabError, match="no images"):
        data.folder(tmp_path)


def test_synthetic_classes_differ():
    d = data.synthetic(n=200, n_classes=4)
    means = [d.images[d.labels == k].float().mean(0) for k in range(4)]
    assert (means[0] - means[2]).abs().max() > 100


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not in ../shared/data")
def test_real_mnist():
    d = data.mnist(SHARED_DATA, train=False, download=False)
    assert d.images.shape == (10000, 1, 28, 28)
    assert np.bincount(d.labels.numpy()).min() > 800


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs a CUDA device")
def test_a_dataset_the_gpu_cannot_hold_is_gathered_into_pinned_memory(monkeypatch):
    """The dataset stays in pinned host memory; each batch is gathered into a pinned buffer (index_select alone
    returns pageable memory, whose copy cannot overlap the computation) and equals the in-memory batch."""
    images, labels = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.arange(64) % 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16, 16))  # "no room": stay on the host
    pinned = data.Loader(images, labels, 16, "cuda", seed=1)
    assert pinned.images.is_pinned()
    copies = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: copies.append(self.is_pinned()) or to(self, *a, **kw))
    batch = next(pinned.epoch(0))
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert copies and all(copies)
    plain = next(data.Loader(images, labels, 16, "cpu", seed=1).epoch(0))
    assert torch.equal(batch.x.cpu(), plain.x) and torch.equal(batch.y.cpu(), plain.y)
