"""dataset=mvtec: folders in MVTec AD's layout, written here with PIL (mixed sizes, grey and colour, a defect without
a mask), each layout mistake in one line, and the real magnetic tiles of ../shared/data where they are."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from genlab.data.mvtec import mvtec, read_image
from genlab.data.split import position
from genlab.errors import GenlabError
from genlab.parts import build_dataset, test_split as split_of

from conftest import compose_train

MAGNETIC_TILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
SIZES = [(40, 30), (25, 50)]  # (width, height): landscape and portrait


def save(path: Path, size, mode="L", box=None, value=255, background=0) -> None:
    """An image (or mask) of ``size`` (w, h): ``background``, with ``value`` inside ``box`` (x0, y0, x1, y1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0]), background, dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = value
    image = Image.fromarray(pixels)
    image.convert(mode).save(path)


def layout(root: Path, n_train: int = 10) -> Path:
    """train/good: n_train images of two sizes, grey and colour; test/good: 2; test/crack: 2, each with a mask, the
    defect in the top-left quarter of one and the bottom-right of the other; test/hole: 2, one without a mask."""
    for i in range(n_train):
        save(root / "train" / "good" / f"{i:03d}.png", SIZES[i % 2], "L" if i % 3 else "RGB", background=100)
    save(root / "test" / "good" / "000.png", SIZES[0], background=100)
    save(root / "test" / "good" / "001.jpg", SIZES[1], "RGB", background=100)
    corners = {"000": (0, 0, 20, 15), "001": (20, 15, 40, 30)}  # quarters of a 40x30 image
    for stem, box in corners.items():
        save(root / "test" / "crack" / f"{stem}.png", SIZES[0], "RGB", box, 250, 30)
        save(root / "ground_truth" / "crack" / f"{stem}_mask.png", SIZES[0], "L", box, 255)
    save(root / "test" / "hole" / "000.png", SIZES[1], "L", (5, 5, 10, 10), 250, 30)
    save(root / "ground_truth" / "hole" / "000_mask.png", SIZES[1], "L", (5, 5, 10, 10), 1)  # > 0 is a defect
    save(root / "test" / "hole" / "001.png", SIZES[1], "L", (0, 0, 5, 5), 250, 30)  # no mask: allowed
    return root


def test_the_test_split_has_labels_masks_and_paths(tmp_path):
    data = mvtec(layout(tmp_path), train=False, image_size=16)
    assert data.images.shape == (6, 1, 16, 16) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.class_names == ["good", "crack", "hole"]
    assert data.paths == ["test/good/000.png", "test/good/001.jpg", "test/crack/000.png", "test/crack/001.png",
                          "test/hole/000.png", "test/hole/001.png"]
    assert data.masks.shape == (6, 1, 16, 16) and data.masks.dtype == torch.uint8
    assert set(data.masks.unique().tolist()) == {0, 1}
    assert data.mask_known.tolist() == [True, True, True, True, True, False]
    per_image = data.masks.flatten(1).sum(1)
    assert per_image[:2].tolist() == [0, 0] and per_image[5] == 0  # good, and the defect without a mask
    assert (per_image[2:5] > 0).all()
    assert data.name == "mvtec" and len(data) == 6


def test_a_defect_lands_where_it_was_drawn(tmp_path):
    """The crack drawn in the top-left quarter of its image is in the top-left quarter of the 16-pixel mask, and
    the image's bright pixels with it; the other crack in the bottom-right."""
    data = mvtec(layout(tmp_path), train=False, image_size=16)
    top_left, bottom_right = data.masks[2, 0], data.masks[3, 0]
    assert top_left[:8, :8].all() and not top_left[8:].any() and not top_left[:, 8:].any()
    assert bottom_right[8:, 8:].all() and not bottom_right[:8].any() and not bottom_right[:, :8].any()
    assert data.images[2, 0, :7, :7].min() > 200 and data.images[2, 0, 9:, 9:].max() < 60


def test_crop_keeps_the_centre_and_resize_squashes(tmp_path):
    """A 40x20 image with a defect in its left quarter (x 0-10) and one across its centre (x 15-25): resize keeps
    both where they were, across the width; crop keeps the centre 20x20 square, where the left one is not."""
    save(tmp_path / "train" / "good" / "a.png", (40, 20))
    for stem, box in {"left": (0, 0, 10, 20), "centre": (15, 0, 25, 20)}.items():
        save(tmp_path / "test" / "cut" / f"{stem}.png", (40, 20), "L", box, 250, 30)
        save(tmp_path / "ground_truth" / "cut" / f"{stem}_mask.png", (40, 20), "L", box, 255)
    resized = mvtec(tmp_path, train=False, image_size=16, fit="resize")
    cropped = mvtec(tmp_path, train=False, image_size=16, fit="crop")
    columns = {name: [d.masks[i, 0].any(0).nonzero().squeeze(1).tolist() for i in range(2)]
               for name, d in {"resize": resized, "crop": cropped}.items()}  # the centre image sorts first
    assert columns["resize"] == [list(range(6, 10)), list(range(0, 4))]
    assert columns["crop"] == [list(range(4, 12)), []]
    assert (resized.masks.sum((1, 2, 3)) == 16 * torch.tensor([4, 4])).all()  # whole columns, every row


def test_channels_convert_any_mode(tmp_path):
    layout(tmp_path)
    rgb = mvtec(tmp_path, image_size=8, channels=3)
    grey = mvtec(tmp_path, image_size=8, channels=1)
    assert rgb.images.shape[1:] == (3, 8, 8) and grey.images.shape[1:] == (1, 8, 8)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])  # grey pictures, whatever their files' mode
    assert torch.equal(rgb.images[:, :1], grey.images)
    with pytest.raises(GenlabError, match="1 \\(grey\\) or 3 \\(RGB\\) channels; got dataset.channels=2"):
        mvtec(tmp_path, channels=2)


def test_the_validation_split_is_held_out_of_train_good_by_name(tmp_path):
    layout(tmp_path, n_train=30)
    train, val = mvtec(tmp_path, image_size=8, val_fraction=0.2), mvtec(tmp_path, image_size=8, validation=True,
                                                                       val_fraction=0.2)
    names = {f"train/good/{i:03d}.png" for i in range(30)}
    assert set(train.paths).isdisjoint(val.paths) and set(train.paths) | set(val.paths) == names
    assert set(val.paths) == {n for n in names if position(n) < 0.2} and 0 < len(val) < 30
    for d in (train, val):
        assert d.labels.dtype == torch.int64 and not d.labels.any() and d.class_names == ["good"]
        assert not d.masks.any() and d.masks.shape == (len(d), 1, 8, 8) and d.mask_known.all()
    save(tmp_path / "train" / "good" / "new.png", SIZES[0], background=100)  # an added file moves no other one
    later = mvtec(tmp_path, image_size=8, validation=True, val_fraction=0.2)
    assert set(later.paths) - {"train/good/new.png"} == set(val.paths)
    two = tmp_path / "two"
    for i in range(2):
        save(two / "train" / "good" / f"{i}.png", SIZES[0])
    assert len(mvtec(two, image_size=8)) == len(mvtec(two, image_size=8, validation=True, val_fraction=0.01)) == 1


def test_categories_under_one_root(tmp_path):
    layout(tmp_path / "tile")
    layout(tmp_path / "wood", n_train=4)
    assert len(mvtec(tmp_path, category="wood", image_size=8, val_fraction=0)) == 4
    assert mvtec(tmp_path, category="tile", train=False, image_size=8).paths[0] == "test/good/000.png"
    with pytest.raises(GenlabError, match="holds 2 categories \\(tile, wood\\); choose one with dataset.category"):
        mvtec(tmp_path)
    with pytest.raises(GenlabError, match="dataset.category=stone: .* the categories under .* are: tile, wood"):
        mvtec(tmp_path, category="stone")


def test_classes_keep_their_masks_and_paths(tmp_path):
    data = mvtec(layout(tmp_path), train=False, image_size=8, classes=[0, 2])
    assert data.labels.tolist() == [0, 0, 2, 2] and data.class_names == ["good", "crack", "hole"]
    assert data.paths[2:] == ["test/hole/000.png", "test/hole/001.png"]
    assert data.mask_known.tolist() == [True, True, True, False] and data.masks[2].any() and not data.masks[3].any()


def test_read_image_brings_one_file_to_the_datasets_geometry(tmp_path):
    """`genlab predict` reads new files with read_image: each as the dataset's reader makes it."""
    layout(tmp_path)
    for fit, channels in [("resize", 1), ("crop", 3)]:
        data = mvtec(tmp_path, train=False, image_size=16, channels=channels, fit=fit)
        for i, name in enumerate(data.paths):
            assert torch.equal(read_image(tmp_path / name, 16, channels, fit), data.images[i]), name
    (tmp_path / "broken.png").write_bytes(b"\x89PNG")
    with pytest.raises(GenlabError, match="cannot read the image .*broken.png"):
        read_image(tmp_path / "broken.png", 16)


def _no_train_good(root):
    (root / "train" / "good").rename(root / "train" / "ok")


def _orphan_mask(root):
    save(root / "ground_truth" / "crack" / "ghost_mask.png", SIZES[0])


def _wrong_size(root):
    save(root / "ground_truth" / "crack" / "000_mask.png", (10, 12))


def _unreadable(root):
    (root / "test" / "hole" / "000.png").write_bytes(b"not a picture")


def _empty_test(root):
    for p in (root / "test").rglob("*.*"):
        p.unlink()


@pytest.mark.parametrize("spoil, message", [
    (_no_train_good, "there is no .*train/good/ .*expected the MVTec AD layout: train/good/"),
    (_orphan_mask, "the mask ground_truth/crack/ghost_mask.png has no test image: expected test/crack/ghost.png"),
    (_wrong_size, "the mask ground_truth/crack/000_mask.png is 10x12 pixels but its image test/crack/000.png is 40x30"),
    (_unreadable, "cannot read the image test/hole/000.png \\("),
    (_empty_test, "test/ holds no images"),
])
def test_a_layout_mistake_is_one_line(tmp_path, spoil, message):
    layout(tmp_path)
    spoil(tmp_path)
    with pytest.raises(GenlabError, match=message) as caught:
        mvtec(tmp_path, train=False, image_size=8)
    assert "\n" not in str(caught.value)


def test_an_unreadable_training_image_is_named(tmp_path):
    layout(tmp_path)
    (tmp_path / "train" / "good" / "001.png").write_bytes(b"")
    with pytest.raises(GenlabError, match="cannot read the image train/good/001.png"):
        mvtec(tmp_path, image_size=8, val_fraction=0)


def test_the_composed_config_builds_each_split(tmp_path):
    cfg = compose_train(["dataset=mvtec", f"dataset.root={layout(tmp_path)}", "dataset.image_size=16",
                         "dataset.val_fraction=0.2"])
    assert cfg.dataset._target_ == "genlab.data.mvtec.mvtec"  # genlab.inspection tells an inspection run by it
    train = build_dataset(cfg.dataset, train=True)
    assert train.image_shape == (1, 16, 16) and len(train) + len(split_of(cfg, validation=True)) == 10
    test = split_of(cfg, classes=[1])
    assert test.labels.tolist() == [1, 1] and test.masks.shape == (2, 1, 16, 16)
    folder = OmegaConf.create({"dataset": {"_target_": "genlab.data.folder", "root": str(tmp_path / "train")}})
    with pytest.raises(GenlabError, match="genlab.data.folder has no validation split: only inspection datasets "
                                          "\\(dataset=mvtec\\) have one"):
        split_of(folder, validation=True)
    assert len(split_of(folder)) >= 1  # other datasets are built as before


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason=f"the magnetic tiles are not in {MAGNETIC_TILE}")
def test_the_magnetic_tiles():
    start = time.perf_counter()
    test = mvtec(str(MAGNETIC_TILE), train=False, image_size=64)
    train, val = mvtec(str(MAGNETIC_TILE), image_size=64), mvtec(str(MAGNETIC_TILE), image_size=64, validation=True)
    took = time.perf_counter() - start
    assert took < 60, f"decoding the magnetic tiles took {took:.0f} s"
    assert test.class_names == ["good", "blowhole", "break", "crack", "fray", "uneven"]
    assert test.labels.bincount().tolist() == [252, 115, 85, 57, 32, 103]
    defective = test.labels > 0
    assert int(defective.sum()) == 392 and test.mask_known[defective].all()
    assert not test.masks[~defective].any()
    assert (test.masks[defective].flatten(1).any(1)).float().mean() > 0.95  # thin cracks may fall between samples
    assert len(train) + len(val) == 700 and set(train.paths).isdisjoint(val.paths) and len(val) > 0
    assert test.images.shape == (644, 1, 64, 64) and train.images.shape[1:] == (1, 64, 64)


def test_val_defects_moves_a_share_of_test_into_validation_with_masks(tmp_path):
    layout(tmp_path, n_train=10)
    full = mvtec(tmp_path, train=False, image_size=8)
    test = mvtec(tmp_path, train=False, image_size=8, val_defects=0.5)
    val = mvtec(tmp_path, validation=True, image_size=8, val_defects=0.5)
    moved = set(full.paths) - set(test.paths)
    assert moved and set(test.paths) < set(full.paths)
    assert moved == {p for p in val.paths if p.startswith("test/")}
    assert val.class_names == full.class_names and val.labels.max() >= 0
    for p in moved:  # a moved image keeps its label and mask
        i, j = full.paths.index(p), val.paths.index(p)
        assert full.labels[i] == val.labels[j] and torch.equal(full.masks[i], val.masks[j])
    with pytest.raises(GenlabError, match="val_defects"):
        mvtec(tmp_path, train=False, val_defects=1.0)
