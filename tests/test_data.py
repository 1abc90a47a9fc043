"""Datasets: real VOC / COCO-Stuff folder layouts built in tmp_path, and the generated toy world."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitmatch.config import DataConfig, ToyWorldConfig
from splitmatch import splits
from splitmatch.data import (DataError, ToyWorld, build_dataset, collate, export_toyworld,
                             generate, render)

VOC_UNSEEN = set(splits.unseen_ids("voc"))        # {15..19}
COCO_UNSEEN = set(splits.unseen_ids("coco_stuff"))
TOY_UNSEEN = set(splits.unseen_ids("toyworld"))   # leaf, starfish, donut
H, W = 40, 48


def _raw_voc_label(seed: int) -> np.ndarray:
    """Blocks of background, a seen class, two unseen classes and a 255 border."""
    raw = np.zeros((H, W), dtype=np.uint8)
    raw[5:20, 5:25] = 1 + seed % 3        # aeroplane / bicycle / bird (seen)
    raw[20:38, 0:20] = 16                 # pottedplant (unseen)
    raw[0:25, 30:48] = 20                 # tvmonitor (unseen)
    raw[25:40, 25:45] = 15                # person (seen, id 14)
    raw[0, :] = 255
    return raw


def _image_pixels(seed: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A smooth colour gradient (JPEG keeps it almost exactly), different per seed."""
    y, x = np.mgrid[0:size[0], 0:size[1]]
    base = np.array([40 + 30 * seed, 120, 200 - 30 * seed])
    return (base + np.stack([x, y, x + y], axis=-1)).clip(0, 255).astype(np.uint8)


def _save_image(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    Image.fromarray(_image_pixels(seed, size)).save(path, quality=95)


def _save_palette_label(path: Path, raw: np.ndarray) -> None:
    """VOC ships palette PNGs: the stored indices, not the colours, are the raw ids."""
    img = Image.frombytes("P", (raw.shape[1], raw.shape[0]), raw.tobytes())
    img.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    img.save(path)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    ids = [f"2007_00000{i}" for i in range(4)]
    for i, name in enumerate(ids):
        _save_image(root / "JPEGImages" / f"{name}.jpg", i)
        raw = _raw_voc_label(i)
        if i % 2:
            _save_palette_label(root / "SegmentationClassAug" / f"{name}.png", raw)
        else:
            Image.fromarray(raw).save(root / "SegmentationClassAug" / f"{name}.png")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(ids) + "\n\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[:2]) + "\n")
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco_stuff164k"
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, name in enumerate(["000000000285", "000000000139", "000000000632"]):
            _save_image(root / "images" / split / f"{name}.jpg", i)
            raw = np.full((H, W), 255, dtype=np.uint8)
            raw[:20, :24] = 0          # person (seen)
            raw[:20, 24:] = 19         # cow (unseen)
            raw[20:, :24] = 170        # wood (seen, last id)
            raw[20:, 24:40] = 157      # tree (unseen)
            Image.fromarray(raw).save(root / "annotations" / split / f"{name}_labelTrainIds.png")
    return root


def _voc_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="voc", root=str(root), train_split="train_aug", crop_size=32,
                      min_scale=0.5, max_scale=1.5, **kw)


def _expected_voc(raw: np.ndarray) -> np.ndarray:
    expected = raw.astype(np.int64) - 1
    expected[(raw == 0) | (raw == 255)] = 255
    return expected


# ----------------------------------------------------------------------------- VOC / COCO-Stuff


def test_voc_val_sample_format_and_label_mapping(voc_root: Path) -> None:
    ds = build_dataset(_voc_cfg(voc_root), "val", train=False)
    assert len(ds) == 2
    assert ds.class_names == splits.VOC_CLASSES
    assert ds.unseen_ids == [15, 16, 17, 18, 19] and ds.seen_ids == list(range(15))
    assert ds.ignore_index == 255
    for i in range(len(ds)):
        sample = ds[i]
        assert set(sample) == {"image", "label", "index", "path"}
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, H, W)
        assert sample["label"].dtype == torch.int64 and sample["label"].shape == (H, W)
        assert sample["index"] == i and sample["path"].endswith(f"2007_00000{i}.jpg")
        # Label PNGs are lossless: the mapping must be exact, unseen ids kept for evaluation.
        np.testing.assert_array_equal(sample["label"].numpy(), _expected_voc(_raw_voc_label(i)))
        assert {15, 19} <= set(sample["label"].unique().tolist())
    # The JPEG decodes to (nearly) the pixels written; no normalisation happens here.
    diff = ds[0]["image"].permute(1, 2, 0).numpy().astype(int) - _image_pixels(0).astype(int)
    assert np.abs(diff).mean() < 3


def test_voc_train_has_no_unseen_pixel_after_augmentation(voc_root: Path) -> None:
    ds = build_dataset(_voc_cfg(voc_root), "train_aug", train=True, seed=3)
    seen_found: set[int] = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            sample = ds[i]
            assert sample["image"].shape == (3, 32, 32) and sample["label"].shape == (32, 32)
            ids = set(sample["label"].unique().tolist())
            assert not ids & VOC_UNSEEN, f"unseen ids {ids & VOC_UNSEEN} in train sample {i}"
            assert ids <= set(range(15)) | {255}
            seen_found |= ids
    assert {0, 14} <= seen_found  # seen classes do survive


def test_unseen_masking_happens_before_transforms(voc_root: Path) -> None:
    """Without augmentation the train label is exactly the val label with unseen ids -> 255."""
    ds_train = build_dataset(_voc_cfg(voc_root), "train_aug", train=True)
    ds_train.augment = None
    expected = _expected_voc(_raw_voc_label(0))
    expected[np.isin(expected, list(VOC_UNSEEN))] = 255
    np.testing.assert_array_equal(ds_train[0]["label"].numpy(), expected)


def test_custom_unseen_list(voc_root: Path) -> None:
    ds = build_dataset(_voc_cfg(voc_root, unseen=["person"]), "train_aug", train=True)
    assert ds.unseen_ids == [14]
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            assert 14 not in ds[i]["label"].unique().tolist()


def test_padding_when_crop_is_larger_than_image(voc_root: Path) -> None:
    cfg = _voc_cfg(voc_root)
    cfg.crop_size, cfg.min_scale, cfg.max_scale = 64, 1.0, 1.0
    sample = build_dataset(cfg, "train_aug", train=True)[0]
    assert sample["image"].shape == (3, 64, 64)
    label, image = sample["label"], sample["image"]
    # Scale 1 keeps 40x48; padding goes below and right (left after a flip): 0 image, 255 label.
    assert (label[H:] == 255).all() and (image[:, H:] == 0).all()
    right, left = slice(W, None), slice(None, 64 - W)
    cols = right if (label[:, right] == 255).all() else left
    assert (label[:, cols] == 255).all() and (image[:, :, cols] == 0).all()
    assert (label[:H] != 255).any()


def test_augmentation_is_reproducible_and_uses_no_global_rng(voc_root: Path) -> None:
    cfg = _voc_cfg(voc_root)
    a = build_dataset(cfg, "train_aug", train=True, seed=7)
    b = build_dataset(cfg, "train_aug", train=True, seed=7)
    state = torch.get_rng_state()
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["label"], sb["label"])
    assert torch.equal(state, torch.get_rng_state())

    def draws(ds, epoch: int) -> list[torch.Tensor]:
        ds.set_epoch(epoch)
        return [ds[i]["image"] for i in range(len(ds))]

    first = draws(a, 0)
    assert all(torch.equal(x, y) for x, y in zip(first, draws(a, 0)))
    assert not all(torch.equal(x, y) for x, y in zip(first, draws(a, 1)))
    other_seed = build_dataset(cfg, "train_aug", train=True, seed=8)
    assert not all(torch.equal(x, y) for x, y in zip(first, draws(other_seed, 0)))


def test_coco_stuff_loading_and_unseen_masking(coco_root: Path) -> None:
    cfg = DataConfig(dataset="coco_stuff", root=str(coco_root), train_split="train2017",
                     test_split="val2017", crop_size=24)
    val = build_dataset(cfg, "val2017", train=False)
    assert len(val) == 3 and len(val.class_names) == 171
    # Sorted listing of annotation files gives the order.
    assert [Path(val[i]["path"]).name for i in range(3)] == [
        "000000000139.jpg", "000000000285.jpg", "000000000632.jpg"]
    assert set(val[0]["label"].unique().tolist()) == {0, 19, 157, 170, 255}
    train = build_dataset(cfg, "train2017", train=True)
    for epoch in range(4):
        train.set_epoch(epoch)
        for i in range(len(train)):
            label = train[i]["label"]
            assert label.shape == (24, 24)
            assert not set(label.unique().tolist()) & COCO_UNSEEN


# ----------------------------------------------------------------------------- errors


def _break_missing_image(root: Path) -> Path:
    path = root / "JPEGImages" / "2007_000001.jpg"
    path.unlink()
    return path


def _break_corrupt_image(root: Path) -> Path:
    path = root / "JPEGImages" / "2007_000001.jpg"
    path.write_bytes(b"\xff\xd8 this is not a jpeg " * 20)
    return path


def _break_label_range(root: Path) -> Path:
    path = root / "SegmentationClassAug" / "2007_000001.png"
    raw = _raw_voc_label(1)
    raw[10, 10] = 21  # one past tvmonitor
    Image.fromarray(raw).save(path)
    return path


def _break_size(root: Path) -> Path:
    path = root / "JPEGImages" / "2007_000001.jpg"
    _save_image(path, 1, size=(H + 2, W))
    return path


BREAKERS = {"missing image": (_break_missing_image, "not found"),
            "corrupt image": (_break_corrupt_image, "cannot decode"),
            "label out of range": (_break_label_range, "out of range: [21]"),
            "size mismatch": (_break_size, "differs from label")}


@pytest.mark.parametrize("problem", sorted(BREAKERS))
def test_bad_sample_raises_naming_the_file(voc_root: Path, problem: str) -> None:
    breaker, message = BREAKERS[problem]
    path = breaker(voc_root)
    ds = build_dataset(_voc_cfg(voc_root), "val", train=False)
    assert ds[0]["index"] == 0
    with pytest.raises(DataError, match=re.escape(str(path))) as info:
        ds[1]
    assert message in str(info.value)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    with pytest.raises(DataError, match=re.escape(str(path))):
        next(iter(loader))


def test_coco_label_value_out_of_range(coco_root: Path) -> None:
    path = coco_root / "annotations" / "val2017" / "000000000285_labelTrainIds.png"
    raw = np.full((H, W), 200, dtype=np.uint8)
    Image.fromarray(raw).save(path)
    ds = build_dataset(DataConfig(dataset="coco_stuff", root=str(coco_root)), "val2017", False)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*out of range: \\[200\\]"):
        ds[1]


def test_missing_split_list_raises_naming_the_file(voc_root: Path, coco_root: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(voc_root / "ImageSets/Segmentation/tr.txt"))):
        build_dataset(_voc_cfg(voc_root), "tr", train=True)
    with pytest.raises(DataError, match=re.escape(str(coco_root / "annotations" / "test2017"))):
        build_dataset(DataConfig(dataset="coco_stuff", root=str(coco_root)), "test2017", False)
    with pytest.raises(DataError, match="toyworld has splits"):
        build_dataset(DataConfig(), "holdout", train=False)


def test_skip_mode_returns_none_and_collate_reports_skipped(voc_root: Path) -> None:
    path = _break_corrupt_image(voc_root)
    ds = build_dataset(_voc_cfg(voc_root, on_error="skip"), "train_aug", train=True)
    assert ds[1] is None
    assert ds.last_error["path"] == str(path) and "cannot decode" in ds.last_error["error"]
    assert ds[0] is not None

    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)
    assert batch["index"] == [0, 2] and len(batch["path"]) == 2
    assert len(batch["skipped"]) == 1

    # Through a DataLoader the skipped record names the file.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    (batch,) = list(loader)
    assert batch["index"] == [0, 2, 3] and batch["image"].shape == (3, 3, 32, 32)
    assert batch["skipped"] == [{"path": str(path), "error": ds.last_error["error"]}]
    assert str(path) in batch["skipped"][0]["error"]

    empty = collate([None])
    assert empty["image"].shape[0] == 0 and empty["index"] == [] and len(empty["skipped"]) == 1


# ----------------------------------------------------------------------------- toy world


def test_toyworld_is_deterministic() -> None:
    cfg = ToyWorldConfig(seed=5)
    image, label = generate(cfg, "train", 3)
    again_image, again_label = generate(cfg, "train", 3)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    assert not np.array_equal(image, generate(cfg, "train", 4)[0])
    assert not np.array_equal(image, generate(cfg, "val", 3)[0])
    assert not np.array_equal(generate(cfg, "test", 3)[0], generate(cfg, "val", 3)[0])
    assert not np.array_equal(image, generate(ToyWorldConfig(seed=6), "train", 3)[0])
    a, b = render(11, 64, 3), render(11, 64, 3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert label.shape == (128, 128) and label.dtype == np.uint8


def test_toyworld_statistics_over_200_images() -> None:
    cfg = ToyWorldConfig(num_train=200)
    pixel_counts = np.zeros(10, dtype=np.int64)
    background_std, background_mean, covered = [], [], []
    for index in range(200):
        image, label = generate(cfg, "train", index)
        ids = np.unique(label)
        assert set(ids.tolist()) <= set(range(10)) | {255}
        pixel_counts += np.bincount(label[label != 255], minlength=10)
        background = image[label == 255].astype(np.float64)
        background_std.append(background.std(axis=0).mean())
        background_mean.append(background.mean(axis=0))
        covered.append((label != 255).mean())
    # Every class is visible, none is rare.
    assert (pixel_counts > 0.03 * pixel_counts.sum()).all(), pixel_counts
    # Backgrounds vary inside an image and between images.
    assert np.median(background_std) > 6.0
    assert np.std(np.array(background_mean), axis=0).mean() > 12.0
    # Objects cover a fair share of the image.
    assert 0.12 < np.mean(covered) < 0.7


def test_toyworld_objects_have_a_minimum_size() -> None:
    for cls in range(10):
        for seed in range(8):
            _, label = render(seed, 128, 1, [cls])
            ys, xs = np.nonzero(label == cls)
            assert len(ys) > 0
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert extent >= 0.12 * 128, (splits.TOYWORLD_CLASSES[cls], seed, extent)
    with pytest.raises(ValueError, match="2 entries for 3 objects"):
        render(0, 64, 3, [0, 1])


def test_toyworld_dataset_train_masks_unseen_and_collates() -> None:
    cfg = DataConfig(crop_size=96, min_scale=0.75, max_scale=1.25,
                     toyworld=ToyWorldConfig(num_train=40, num_val=20, image_size=96))
    train = build_dataset(cfg, cfg.train_split, train=True, seed=1)
    val = build_dataset(cfg, "val", train=False)
    assert isinstance(train, ToyWorld) and len(train) == 40 and len(val) == 20
    val_ids: set[int] = set()
    for i in range(len(train)):
        assert not set(train[i]["label"].unique().tolist()) & TOY_UNSEEN
    for i in range(len(val)):
        val_ids |= set(val[i]["label"].unique().tolist())
    assert TOY_UNSEEN <= val_ids
    batch = collate([train[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 96, 96) and batch["label"].dtype == torch.int64
    assert batch["path"][0] == "toyworld/train/000000" and batch["skipped"] == []


def test_export_toyworld_round_trip(tmp_path: Path) -> None:
    cfg = DataConfig(toyworld=ToyWorldConfig(num_val=3, image_size=64))
    out = export_toyworld(cfg, tmp_path / "toy", "val")
    assert out == tmp_path / "toy" / "val"
    ids = (out / "list.txt").read_text().split()
    assert ids == ["000000", "000001", "000002"]
    for index, name in enumerate(ids):
        image, label = generate(cfg.toyworld, "val", index)
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / f"{name}.png")), image)
        np.testing.assert_array_equal(np.asarray(Image.open(out / "labels" / f"{name}.png")), label)
