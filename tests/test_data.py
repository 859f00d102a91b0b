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
    """The dataset stays where it is on the host (no pinned copy of all of it: a memory-mapped one would be read
    into memory); each batch is gathered into a pinned buffer (index_select alone returns pageable memory, whose
    copy cannot overlap the computation) and equals the in-memory batch."""
    images, labels = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.arange(64) % 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16, 16))  # "no room": stay on the host
    host = data.Loader(images, labels, 16, "cuda", seed=1)
    assert host.images is images
    copies = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: copies.append(self.is_pinned()) or to(self, *a, **kw))
    batch = next(host.epoch(0))
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert copies and all(copies)
    plain = next(data.Loader(images, labels, 16, "cpu", seed=1).epoch(0))
    assert torch.equal(batch.x.cpu(), plain.x) and torch.equal(batch.y.cpu(), plain.y)


def rss_anon() -> int:
    """This process's own (anonymous) memory in bytes: what a memory-mapped dataset must not grow."""
    line = next(line for line in open("/proc/self/status") if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_memory_mapped_dataset_gives_the_same_batches(tmp_path):
    """in_memory=false maps the cache file instead of reading it: the same images, the same batches for a seed,
    and reading all of it leaves the process's own memory where it was (the pages are the file's)."""
    images, labels = fake_images(40000, 28, 28)
    write_idx(tmp_path / "MNIST" / "raw", "train", images, labels)
    held = data.mnist(tmp_path, download=False, in_memory=True)
    mapped = data.mnist(tmp_path, download=False, in_memory=False)
    assert torch.equal(held.images, mapped.images) and torch.equal(held.labels, mapped.labels)
    assert mapped.images.untyped_storage().data_ptr() != held.images.untyped_storage().data_ptr()
    batches = [list(data.Loader(d.images, d.labels, 64, seed=3).epoch(1)) for d in (held, mapped)]
    assert len(batches[0]) == 40000 // 64
    for a, b in zip(*batches):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    before = rss_anon()
    again = data.mnist(tmp_path, download=False, in_memory=False)
    total = sum(int(b.x.sum() > 0) for b in data.Loader(again.images, again.labels, 500).epoch(0))
    # the 31 MB of images are not copied into memory (a copy would add them all; the allocator moves ~10 MB by itself)
    assert total == 80 and rss_anon() - before < 20_000_000


def test_automatic_choice_maps_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    write_idx(tmp_path / "MNIST" / "raw", "train", *fake_images(40, 28, 28))
    assert data.fits_in_memory(40 * 28 * 28)
    monkeypatch.setattr(data.cache, "available_memory", lambda: 8 * 40 * 28 * 28 - 8)  # an eighth is one byte short
    assert not data.fits_in_memory(40 * 28 * 28)
    mapped = data.mnist(tmp_path, download=False)
    monkeypatch.setattr(data.cache, "available_memory", lambda: 8 * 40 * 28 * 28)
    held = data.mnist(tmp_path, download=False)
    assert torch.equal(held.images, mapped.images)
    with open("/proc/self/maps") as fh:  # the mapped one is a mapping of the cache file
        assert any(str(tmp_path / "cache") in line and line.rstrip().endswith(".u8") for line in fh)


def test_the_processes_of_a_machine_share_the_memory_budget(tmp_path, monkeypatch):
    """torchrun --nproc_per_node=16: each process may hold a 16th of what one alone may, so that together they take
    an eighth of the memory, not two machines' worth; a dataset that fits one process but not a 16th is mapped
    (one copy in the page cache for all 16)."""
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    write_idx(tmp_path / "MNIST" / "raw", "train", *fake_images(40, 28, 28))
    nbytes = 40 * 28 * 28
    monkeypatch.setattr(data.cache, "available_memory", lambda: 8 * 4 * nbytes)  # one process: 4x what it takes
    alone = data.cache.memory_budget()
    assert alone == 4 * nbytes and data.fits_in_memory(nbytes)
    data.mnist(tmp_path, download=False)  # decoded and held in memory: no mapping of its cache file
    mapped = lambda: any(str(tmp_path / "cache") in line and line.rstrip().endswith(".u8")  # noqa: E731
                         for line in open("/proc/self/maps"))
    assert not mapped()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert data.cache.memory_budget() == alone // 16 and not data.fits_in_memory(nbytes)
    shared = data.mnist(tmp_path, download=False)
    assert mapped() and shared.images.shape == (40, 1, 28, 28)


def test_damaged_images_file_is_decoded_again(tmp_path, caplog, monkeypatch):
    """A truncated images file is caught by its size (mapped or not); a changed byte by its checksum when the
    images are read into memory."""
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    images, labels = fake_images(30, 28, 28)
    write_idx(tmp_path / "MNIST" / "raw", "train", images, labels)
    data.mnist(tmp_path, download=False)
    cached = next((data.cache_dir() / "datasets").glob("mnist-train-*.u8"))
    cached.write_bytes(cached.read_bytes()[:-1])
    with caplog.at_level("WARNING"):
        assert torch.equal(data.mnist(tmp_path, download=False, in_memory=False).images[:, 0], torch.from_numpy(images))
    assert "ignoring the unreadable dataset cache" in caplog.text and "bytes, not the 23,520" in caplog.text
    blob = bytearray(cached.read_bytes())
    blob[100] ^= 1
    cached.write_bytes(bytes(blob))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert torch.equal(data.mnist(tmp_path, download=False, in_memory=True).images[:, 0], torch.from_numpy(images))
    assert "no longer matches the checksum" in caplog.text


def write_pngs(folder, n, size=12, classes=("a", "b")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / classes[i % len(classes)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(
            folder / classes[i % len(classes)] / f"{i:04d}.png")


def test_folder_decode_interrupted_then_resumed(tmp_path, monkeypatch):
    """Ctrl-C during the first decode keeps the chunks done; the next run decodes only the others, and the result
    equals an uninterrupted decode (in parallel workers, in another cache)."""
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    write_pngs(tmp_path / "images", 45)
    (tmp_path / "images" / "b" / "0999.png").write_bytes(b"not a png")  # left out, wherever it falls
    monkeypatch.setattr(data.decode, "CHUNK", 4)
    decode, calls = data.decode._decode_chunk, []

    def interrupted(paths, size, mode):
        calls.append(paths[0].name)
        if len(calls) == 5 and "resumed" not in calls:
            raise KeyboardInterrupt
        return decode(paths, size, mode)

    monkeypatch.setattr(data.decode, "_decode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.folder(tmp_path / "images", image_size=8, test_fraction=0.0, workers=1)
    assert not list((data.cache_dir() / "datasets").glob("folder-*.u8"))  # not a cache yet: a partial one
    calls[:] = ["resumed"]
    resumed = data.folder(tmp_path / "images", image_size=8, test_fraction=0.0, workers=1)
    assert len(calls) == 1 + 12 - 4  # 46 files in chunks of 4: the 4 finished chunks are not decoded again
    assert resumed.images.shape == (45, 3, 8, 8) and sorted(set(resumed.labels.tolist())) == [0, 1]
    monkeypatch.setattr(data.decode, "_decode_chunk", decode)
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "other"))
    whole = data.folder(tmp_path / "images", image_size=8, test_fraction=0.0, workers=2)
    assert torch.equal(whole.images, resumed.images) and torch.equal(whole.labels, resumed.labels)
    assert not list((data.cache_dir() / "datasets").glob("*.partial"))


def test_processes_wanting_one_dataset_decode_it_once(tmp_path, monkeypatch):
    """Several at once (the ranks of a run, the jobs of a sweep): one decodes, the others wait and read its cache."""
    import threading

    write_pngs(tmp_path / "images", 20)
    decode, calls = data.decode._decode_chunk, []
    monkeypatch.setattr(data.decode, "_decode_chunk", lambda *a: calls.append(1) or decode(*a))
    got = []
    threads = [threading.Thread(target=lambda: got.append(data.folder(tmp_path / "images", image_size=8, workers=1)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and len(calls) == 1
    assert all(torch.equal(d.images, got[0].images) for d in got)


CIFAR10 = SHARED_DATA / "cifar-10-batches-py"


@pytest.mark.skipif(not CIFAR10.is_dir(), reason="real CIFAR-10 not in ../shared/data")
def test_real_cifar10():
    """The shared copy, read by genlab's own reader (torchvision's md5 check refuses it: README.txt there)."""
    train, test = data.cifar10(SHARED_DATA, download=False), data.cifar10(SHARED_DATA, train=False, download=False)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert np.bincount(train.labels.numpy()).tolist() == [5000] * 10
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10
    mean = train.images.float().mean((0, 2, 3)) / 255  # CIFAR-10's published per-channel means
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=5e-4)
    planes = data.cifar10(SHARED_DATA, train=False, download=False, classes=[1], image_size=64, channels=1)
    assert planes.images.shape == (1000, 1, 64, 64) and set(planes.labels.tolist()) == {1}


def solid_pngs(folder, numbers, classes=("a", "b")):
    """One image a number, all of its colour (red: the number % 256, green: // 256), so that a decoded image says
    which file it came from; alternately in the sub-folders ``classes``."""
    from PIL import Image

    for i in numbers:
        (folder / classes[i % len(classes)]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 5), (i % 256, i // 256, 0)).save(folder / classes[i % len(classes)] / f"{i:04d}.png")


def numbers(d) -> set[int]:
    return set((d.images[:, 0, 0, 0].long() + 256 * d.images[:, 1, 0, 0].long()).tolist())


def sides(root, **kwargs) -> dict[bool, set[int]]:
    return {train: numbers(data.folder(root, train=train, image_size=4, workers=1, **kwargs)) for train in (True, False)}


def test_adding_images_to_a_folder_moves_none_between_train_and_test(tmp_path):
    """A file's side is a function of its name: 100 images added to 200 leave each of the 200 where it was (the
    shuffle of the file list genlab used before moved most of them, so a later evaluate scored on training images),
    and the test share stays near test_fraction."""
    solid_pngs(tmp_path, range(200))
    before = sides(tmp_path, test_fraction=0.2)
    assert before[True] | before[False] == set(range(200)) and 25 <= len(before[False]) <= 55
    solid_pngs(tmp_path, range(200, 300))
    after = sides(tmp_path, test_fraction=0.2)
    assert before[True] <= after[True] and before[False] <= after[False]
    assert after[False] - before[False] and 40 <= len(after[False]) <= 80  # some of the new ones test


def test_a_tiny_folder_keeps_an_image_on_each_side():
    """Where the names' hashes leave a side empty though its share is above 0, the image nearest the line crosses."""
    names = [f"{i}.png" for i in range(3)]
    low = min(data.split.position(n) for n in names)
    assert sum(data.split.by_name(names, low / 2)) == 1  # no hash below the line: the lowest tests
    assert sum(data.split.by_name(names, 1 - 1e-12)) == 2  # every hash below it: the highest trains
    assert data.split.by_name(names[:1], 0.5) == [False] and not any(data.split.by_name(names, 0.0))


def test_a_changed_folder_split_is_told_where_the_run_is_evaluated(tmp_path, caplog):
    """A run's checkpoint records its folder's split; `evaluate`, `sample` and resume build the split from the run's
    config, and warn once when files were added or removed since, saying how many training images it now holds."""
    from omegaconf import OmegaConf

    from genlab import checkpoint
    from genlab.parts import test_split

    from conftest import make_trainer

    root = tmp_path / "images"
    solid_pngs(root, range(40))
    make_trainer(["model=gan", "dataset=folder", f"dataset.root={root}", "dataset.image_size=8",
                  "trainer.batch_size=8", "trainer.max_steps=1", "callbacks=[checkpoints]"], tmp_path / "run").fit()
    cfg = OmegaConf.create(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["config"])
    recorded = cfg.dataset.split
    assert recorded.rule == "name" and recorded.images == 40 and len(test_split(cfg)) == recorded.test
    solid_pngs(root, range(40, 80))
    caplog.clear()
    with caplog.at_level("WARNING"):
        test, _ = test_split(cfg), test_split(cfg, train=True)
    assert caplog.text.count("changed since this run recorded it") == 1, caplog.text
    assert (f"(40 images, {recorded.test} for test then; 80 and {len(test)} now): by their names 0 of the images it "
            "trained on are in the test split now") in caplog.text


def test_a_run_from_before_the_name_split_keeps_its_own_split(tmp_path):
    """A checkpoint of a folder run without a recorded split was trained on genlab 0.1's shuffle of the file list:
    it is read with that rule (split=order), so evaluate still tests on the images it held out."""
    from genlab import checkpoint

    state = checkpoint.upgrade({"config": {"dataset": {"_target_": "genlab.data.folder", "root": str(tmp_path)}}})
    assert state["config"]["dataset"]["split"] == "order"
    solid_pngs(tmp_path, range(30))
    by_path = [*range(0, 30, 2), *range(1, 30, 2)]  # the numbers in the files' sorted order: a/ then b/
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    assert sides(tmp_path, test_fraction=0.2, split="order")[False] == {by_path[i] for i in order[:6]}
    with pytest.raises(GenlabError, match="dataset.split must be name or order"):
        data.folder(tmp_path, split="random")


def test_a_fraction_of_the_data_is_the_same_images_class_by_class():
    """dataset.fraction=0.1 keeps a tenth of each class's training images, the same ones in every build; the test
    split stays whole, and a share outside (0, 1] is refused in one line."""
    from omegaconf import OmegaConf

    from genlab.parts import build_dataset

    node = {"_target_": "genlab.data.synthetic", "n": 400, "fraction": 0.1}
    whole = build_dataset(OmegaConf.create({**node, "fraction": None}))
    a, b = build_dataset(OmegaConf.create(node)), build_dataset(OmegaConf.create(node))
    assert torch.equal(a.images, b.images) and len(a) == pytest.approx(40, abs=5)
    for c in range(10):
        assert int((a.labels == c).sum()) == max(1, round(0.1 * int((whole.labels == c).sum())))
    assert len(build_dataset(OmegaConf.create(node), train=False)) == len(build_dataset(
        OmegaConf.create({**node, "fraction": None}), train=False))
    with pytest.raises(GenlabError, match=r"dataset.fraction is the share of the training images kept, in \(0, 1\]"):
        build_dataset(OmegaConf.create({**node, "fraction": 1.5}))
