"""Sources, splits, image decoding and albumentations pipelines."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from finetune.data import ImageDataModule
from finetune.data.images import load_image
from finetune.data.sources import digits, folder
from finetune.data.transforms import eval_transform, train_transform
from finetune.errors import FineTuneError


def _ids(split) -> set[int]:
    return {id(x) for x in split.items}


def test_digits_split_is_stratified_disjoint_and_seeded() -> None:
    a, b = digits(seed=3), digits(seed=3)
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sum(sizes.values()) == 1797 and set(sizes) == {"train", "val", "test"}
    assert abs(sizes["test"] - 0.2 * 1797) <= 1 and abs(sizes["val"] - 0.1 * 1797) <= 2
    total = sum((np.bincount(s.labels, minlength=10) for s in a.splits.values()), np.zeros(10, dtype=int))
    for name, fraction in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert np.array_equal(a.splits[name].labels, b.splits[name].labels)
        counts = np.bincount(a.splits[name].labels, minlength=10)
        assert np.abs(counts - fraction * total).max() <= 2, (name, counts)  # stratified
    ids = [_ids(s) for s in a.splits.values()]
    assert sum(len(i) for i in ids) == len(set().union(*ids)) == 1797  # no image in two splits
    other = digits(seed=4)
    assert not np.array_equal(a.splits["test"].labels, other.splits["test"].labels)


def test_digits_train_per_class_keeps_val_and_test_and_nests() -> None:
    full, small, smaller = digits(seed=3), digits(seed=3, train_per_class=20), digits(seed=3, train_per_class=5)
    assert small.splits["train"].class_counts(10) == [20] * 10 and smaller.splits["train"].class_counts(10) == [5] * 10
    def images(data, name):
        return Counter(x.tobytes() for x in data.splits[name].items)

    for name in ("val", "test"):
        assert images(small, name) == images(full, name)  # the same images score every size
    assert images(smaller, "train") < images(small, "train") < images(full, "train")  # nested subsets
    assert small.notes == ["train: 20 image(s) per class kept (train_per_class)"] and full.notes == []
    with pytest.raises(FineTuneError, match="train_per_class must be at least 1"):
        digits(train_per_class=0)


def test_digits_images_are_rgb_uint8() -> None:
    img = digits().splits["train"].items[0]
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8 and img.max() > 200


def test_folder_flat_layout_splits_validation(make_folder) -> None:
    root = make_folder(classes=3, per_class=10)
    data = folder(root, val_fraction=0.2, seed=0)
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert np.bincount(data.splits["val"].labels).tolist() == [2, 2, 2]
    assert not set(data.splits["val"].items) & set(data.splits["train"].items)
    assert "test" not in data.splits


def test_folder_split_layout(make_folder) -> None:
    root = make_folder(classes=2, per_class=4, splits=("train", "val", "test"))
    data = folder(root)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 8, "test": 8}


def test_folder_counts_ignored_files(make_folder) -> None:
    root = make_folder(classes=2, per_class=4)
    (root / "class_0" / "notes.txt").write_text("not an image")
    data = folder(root, val_fraction=0.25)
    assert any("ignored 1 file" in n for n in data.notes)


def test_folder_skips_hidden_files_and_folders(make_folder) -> None:
    """Notebook checkpoints and dot-files are copies or metadata, not training images (predict skips them too)."""
    root = make_folder(classes=2, per_class=4, splits=("train", "val"))
    rng = np.random.default_rng(1)
    hidden = [write_image(root / "train" / "class_0" / ".ipynb_checkpoints" / "0-checkpoint.png", rng),
              write_image(root / "train" / "class_1" / "sub" / ".cache" / "x.png", rng),
              write_image(root / "val" / "class_1" / "._1.png", rng)]
    write_image(root / "train" / "class_1" / "sub" / "kept.png", rng)  # a visible sub-folder still counts
    data = folder(root)
    items = {str(p) for s in data.splits.values() for p in s.items}
    assert not items & {str(p) for p in hidden}
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 9, "val": 8}
    assert "train: ignored 2 hidden file(s) or file(s) in hidden folders" in data.notes
    assert "val: ignored 1 hidden file(s) or file(s) in hidden folders" in data.notes


def test_folder_bad_input(tmp_path: Path, make_folder) -> None:
    with pytest.raises(FineTuneError, match="does not exist"):
        folder(tmp_path / "nope")
    with pytest.raises(FineTuneError, match="not set"):
        folder(None)
    one = make_folder(classes=1, per_class=4, name="one")
    with pytest.raises(FineTuneError, match="1 class folder.*need at least 2"):
        folder(one)
    root = make_folder(classes=2, per_class=4, name="empty")
    (root / "class_9").mkdir()
    with pytest.raises(FineTuneError, match="holds no images"):
        folder(root)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "RGB"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray((np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)).save(path)
    else:
        Image.new("RGB", (10, 6), (200, 30, 30)).convert(mode).save(path)
    arr = load_image(path)
    assert arr.shape[2] == 3 and arr.dtype == np.uint8
    if mode == "I;16":
        assert arr.max() > 200  # 16-bit range scaled down, not clipped


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).shape[:2] == (20, 10)


def test_transforms_shape_normalization_and_determinism() -> None:
    img = np.full((8, 8, 3), 255, dtype=np.uint8)
    ev = eval_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = ev(image=img)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)  # (1 - 0.5) / 0.5
    rng_img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    assert torch.equal(ev(image=rng_img)["image"], ev(image=rng_img)["image"])
    tr = train_transform(32, (0.5,) * 3, (0.5,) * 3, hflip=0.5)
    assert tr(image=rng_img)["image"].shape == (3, 32, 32)


def test_datamodule_uses_backbone_preprocessing(make_folder) -> None:
    root = make_folder(classes=2, per_class=5)
    dm = ImageDataModule("folder", root=root, backbone="test_efficientnet", val_fraction=0.2, batch_size=4,
                         num_workers=0)
    assert dm.image_size == 160 and dm.mean == (0.485, 0.456, 0.406)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 160, 160) and y.dtype == torch.int64
    assert dm.class_counts() == {"train": [4, 4], "val": [1, 1]}
    dm2 = ImageDataModule("folder", root=root, backbone="test_efficientnet", image_size=48)
    assert dm2.image_size == 48


def test_augment_presets_build_and_none_trains_on_the_eval_pipeline() -> None:
    import albumentations as A

    from finetune.errors import FineTuneError

    for preset, ops in (("light", set()), ("medium", {"ColorJitter", "Affine"}),
                        ("heavy", {"ColorJitter", "Affine", "GaussianBlur", "CoarseDropout"})):
        dm = ImageDataModule("digits", image_size=32, augment=preset)
        dm.setup()
        names = {type(t).__name__ for t in dm.datasets["train"].transform.transforms}
        assert ops <= names and "RandomResizedCrop" in names, preset
    dm = ImageDataModule("digits", image_size=32, augment="none")
    dm.setup()
    assert dm.train_is_deterministic
    a, b = dm.datasets["train"][0][0], dm.datasets["train"][0][0]
    assert torch.equal(a, b) and torch.equal(a, dm.eval_dataset("train")[0][0])
    custom = {"name": "mine", "ops": {"flip": {"_target_": "albumentations.VerticalFlip", "p": 1.0}, "off": None}}
    dm = ImageDataModule("digits", image_size=32, augment=custom)
    dm.setup()
    assert any(isinstance(t, A.VerticalFlip) for t in dm.datasets["train"].transform.transforms)
    with pytest.raises(FineTuneError, match="unknown augment preset 'wild'"):
        ImageDataModule("digits", augment="wild")
    with pytest.raises(FineTuneError, match="augment.ops.bad"):
        ImageDataModule("digits", augment={"name": "x", "ops": {"bad": {"_target_": "albumentations.NoSuchOp"}}})


def test_augment_ops_are_overridable_from_the_command_line() -> None:
    from finetune.builders import build_datamodule
    from finetune.config import compose

    cfg = compose(["augment=medium", "augment.ops.affine.p=0.25", "~augment.ops.color_jitter", "data.image_size=32"])
    dm = build_datamodule(cfg)
    dm.setup()
    ops = {type(t).__name__: t for t in dm.datasets["train"].transform.transforms}
    assert "ColorJitter" not in ops and ops["Affine"].p == 0.25


def test_augmentations_are_seeded_by_the_datamodule_seed() -> None:
    def crops(seed: int) -> torch.Tensor:
        dm = ImageDataModule("digits", image_size=32, seed=seed, augment="heavy")
        dm.setup()
        return torch.stack([dm.datasets["train"][i][0] for i in range(8)])

    assert torch.equal(crops(1), crops(1))
    assert not torch.equal(crops(1), crops(2))


# -- sources as registered dataclasses ---------------------------------------------------------


def test_each_source_is_a_typed_structured_config() -> None:
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from finetune.data.sources import SOURCES, Source

    assert set(SOURCES) == {"csv", "digits", "fashion_mnist", "folder", "photos", "torchvision", "webdataset"}
    base = {f.name: f for f in dataclasses.fields(Source)}
    for name, cls in SOURCES.items():
        cfg = OmegaConf.structured(cls)
        assert cfg.source == name and set(base) <= set(cfg)
        with pytest.raises(ValidationError):
            OmegaConf.merge(cfg, {"val_fraction": "x"})
        with pytest.raises(ValidationError):
            OmegaConf.merge(cfg, {"batch_size": "many"})


def test_source_defaults_come_from_its_dataclass() -> None:
    """What the CLI composes for data=NAME is what ImageDataModule(NAME) uses: one place for defaults."""
    import dataclasses

    from omegaconf import OmegaConf

    from finetune.config import compose
    from finetune.data.sources import SOURCES

    digits_dm = ImageDataModule("digits")
    # The digits' own choices, not the generic ones (224 px from the backbone, hflip 0.5, timm's scale).
    assert (digits_dm.image_size, digits_dm.hflip, digits_dm.scale, digits_dm.batch_size) == (64, 0.0, (0.7, 1.0), 64)
    assert digits_dm.num_workers == 0 and digits_dm.source.test_fraction == 0.2
    generic = ImageDataModule("folder", root="unused", backbone="test_efficientnet")
    assert (generic.image_size, generic.hflip, generic.scale, generic.num_workers) == (160, 0.5, (0.08, 1.0), 2)
    for name, cls in SOURCES.items():
        composed = OmegaConf.to_container(compose([f"data={name}"]).data)
        assert composed == dataclasses.asdict(cls()), name


def test_unknown_source_or_option_is_one_line_naming_the_choices(make_folder) -> None:
    from finetune.data.sources import Folder

    with pytest.raises(FineTuneError, match="unknown data source 'foldr'; choose one of csv, digits, .*folder"):
        ImageDataModule("foldr")
    with pytest.raises(FineTuneError, match=r"data=folder has no option\(s\) rooot; it takes .*\broot\b.*val_fraction"):
        ImageDataModule("folder", rooot="x")
    with pytest.raises(FineTuneError, match=r"data=digits has no option\(s\) root"):
        ImageDataModule("digits", root="x")
    data = digits(seed=0)
    with pytest.raises(FineTuneError, match=r"ready DataSplits has no option\(s\) val_fraction; it takes image_size"):
        ImageDataModule(data, val_fraction=0.5)
    # A ready Source takes its own fields as overrides.
    root = make_folder(classes=2, per_class=4)
    dm = ImageDataModule(Folder(root=str(root)), val_fraction=0.5, image_size=16)
    assert dm.class_counts()["val"] == [2, 2] and dm.image_size == 16


def test_a_new_source_is_one_registered_class() -> None:
    from dataclasses import dataclass

    from omegaconf import OmegaConf

    from finetune.data.sources import SOURCES, DataSplits, Source, Split, hold_out, register

    @register("tiny")
    @dataclass
    class Tiny(Source):
        source: str = "tiny"
        image_size: Optional[int] = 16
        num_workers: int = 0
        per_class: int = 6

        def load(self, seed: int) -> DataSplits:
            labels = np.repeat(np.arange(2), self.per_class)
            items = [np.full((8, 8, 3), 200 * label, np.uint8) for label in labels]
            train, val = hold_out(Split(items, labels), 0.5, seed)
            return DataSplits("tiny", ["dark", "light"], {"train": train, "val": val})

    try:
        dm = ImageDataModule("tiny", per_class=4, batch_size=2, augment="none")
        assert dm.image_size == 16 and dm.class_counts() == {"train": [2, 2], "val": [2, 2]}
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (2, 3, 16, 16) and set(y.tolist()) <= {0, 1}
        assert OmegaConf.structured(Tiny).per_class == 6
        with pytest.raises(FineTuneError, match=r"data=tiny has no option\(s\) size"):
            ImageDataModule("tiny", size=3)
    finally:
        SOURCES.pop("tiny", None)
    with pytest.raises(TypeError, match="source must default to 'other'"):
        register("other")(Tiny)


def test_datamodule_accepts_the_builders_call(make_folder) -> None:
    """builders.py passes cfg.data as a plain dict, its 'source' key included, and cfg.augment as one."""
    root = make_folder(classes=2, per_class=5)
    data = {"source": "folder", "root": str(root), "image_size": 24, "num_workers": 0, "val_fraction": 0.4,
            "scale": [0.5, 1.0], "mean": None, "sampler": None, "on_bad_image": "skip"}
    dm = ImageDataModule(backbone="test_resnet", seed=3, augment={"name": "none", "no_aug": True, "ops": {}}, **data)
    assert dm.class_counts()["val"] == [2, 2] and dm.image_size == 24 and dm.scale == (0.5, 1.0)
    assert dm.mean == (0.5, 0.5, 0.5) and dm.interpolation == "bilinear"  # test_resnet's pretrained config
    assert dm.train_is_deterministic and dm.on_bad_image == "skip" and dm.seed == 3


def test_augment_config_forms() -> None:
    from finetune.data.augment import AUGMENT_PRESETS, AugmentConfig, resolve_augment

    assert resolve_augment("none").no_aug and not resolve_augment("heavy").no_aug
    only_ops = resolve_augment({"ops": {"flip": {"_target_": "albumentations.VerticalFlip"}}})
    assert not only_ops.no_aug and only_ops.name == "custom"
    # A label is only a label: an unaugmented config named anything trains on the eval pipeline.
    dm = ImageDataModule("digits", image_size=16, augment=AugmentConfig(name="plain", no_aug=True))
    dm.setup()
    assert dm.train_is_deterministic and dm.datasets["train"].transform is dm.datasets["val"].transform
    assert not ImageDataModule("digits", augment={"name": "none"}).train_is_deterministic
    mine = resolve_augment("medium")
    mine.ops.pop("affine")
    assert "affine" in AUGMENT_PRESETS["medium"].ops  # a resolved preset is the caller's copy
    with pytest.raises(FineTuneError, match="augment=none takes no ops"):
        resolve_augment({"name": "none", "no_aug": True, "ops": {"x": {"_target_": "albumentations.Blur"}}})
    with pytest.raises(FineTuneError, match=r"augment has no option\(s\) opps"):
        resolve_augment({"opps": {}})



def test_a_last_training_batch_of_one_image_is_left_out_so_batchnorm_trains(make_folder, tmp_path: Path) -> None:
    """9 training images in batches of 4: the ninth alone would fail BatchNorm on test_resnet's 1x1 map at 32 px."""
    from finetune.config import compose
    from finetune.train import train

    root = make_folder(classes=3, per_class=4)  # 12 images, 3 of them val
    overrides = ["backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
                 "data.image_size=32", "data.val_fraction=0.25", "data.num_workers=0", "trainer.max_epochs=1",
                 "trainer.enable_progress_bar=false", "calibrate=false"]
    dm = ImageDataModule("folder", root=root, backbone="test_resnet", image_size=32, val_fraction=0.25, batch_size=4)
    assert [len(y) for _, y in dm.train_dataloader()] == [4, 4] and len(dm.datasets["train"]) == 9
    assert [len(y) for _, y in dm.val_dataloader()] == [3]  # evaluation keeps every image
    ten = ImageDataModule("folder", root=root, backbone="test_resnet", image_size=32, val_fraction=0.25, batch_size=5)
    assert [len(y) for _, y in ten.train_dataloader()] == [5, 4]  # a partial batch of more than one stays
    metrics = train(compose([*overrides, "data.batch_size=4"]), tmp_path / "run")
    assert metrics["epochs"] == 1
