"""Faults in the data (issue 13, items 5, 8, 9): each case as a user meets it, with tiny generated images."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

from conftest import write_folder, write_image
from finetune.data import DataSplits, ImageDataModule, Split
from finetune.data.duplicates import check_duplicates, find_duplicates
from finetune.data.images import UnreadableImage
from finetune.data.scan import check_split_images, image_problem
from finetune.data.sources import csv_source, folder
from finetune.errors import FineTuneError


def _exif_with_thumbnail(thumb: bytes) -> bytes:
    """An APP1 segment as a camera writes it: TIFF header, IFD0, IFD1 pointing at the JPEG ``thumb``."""
    ifd1_at = 8 + 2 + 12 + 4
    thumb_at = ifd1_at + 2 + 3 * 12 + 4
    ifd0 = struct.pack("<HHHII", 1, 0x0112, 3, 1, 1) + struct.pack("<I", ifd1_at)  # orientation 1
    ifd1 = (struct.pack("<H", 3) + struct.pack("<HHII", 0x0103, 3, 1, 6) + struct.pack("<HHII", 0x0201, 4, 1, thumb_at)
            + struct.pack("<HHII", 0x0202, 4, 1, len(thumb)) + struct.pack("<I", 0))
    body = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + thumb
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def _camera_jpeg(size: int = 160, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)).resize((size, size))
    thumb, main = io.BytesIO(), io.BytesIO()
    img.resize((48, 48)).save(thumb, "JPEG", quality=80)
    img.save(main, "JPEG", quality=90)
    return main.getvalue()[:2] + _exif_with_thumbnail(thumb.getvalue()) + main.getvalue()[2:]


def test_the_generated_jpeg_carries_a_real_exif_thumbnail() -> None:
    from PIL import ExifTags

    data = _camera_jpeg()
    ifd1 = Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.IFD1)
    start = data.index(b"Exif\x00\x00") + 6 + ifd1[0x201]
    thumb = Image.open(io.BytesIO(data[start:start + ifd1[0x202]]))
    thumb.load()
    assert thumb.size == (48, 48)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9])
def test_scan_reports_a_truncated_jpeg_whose_thumbnail_ends_with_ff_d9(tmp_path: Path, keep: float) -> None:
    data = _camera_jpeg()
    good = tmp_path / "good.jpg"
    good.write_bytes(data)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert b"\xff\xd9" in cut.read_bytes()  # the thumbnail's marker: what fooled the scan before
    assert image_problem(good) is None
    assert "truncated" in image_problem(cut)
    with pytest.raises(FineTuneError, match=r"unreadable image '.*cut.jpg': image file is truncated"):
        check_split_images(DataSplits("x", ["a"], {"train": Split([good, cut], np.zeros(2, np.int64))}))


def test_scan_accepts_jpegs_with_padding_or_trailers_that_decode(tmp_path: Path, monkeypatch) -> None:
    data = _camera_jpeg()
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(data + b"\x00" * 1000)
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(data + b"SEFH" + bytes(range(256)) * 20 + b"SEFT")  # a phone's trailer after FF D9
    cut_then_padded = tmp_path / "cut_padded.jpg"
    cut_then_padded.write_bytes(data[: len(data) // 2] + b"\x00" * 1000)
    assert image_problem(trailer) is None  # the cheap check doubts it; the full decode reads it
    assert "truncated" in image_problem(cut_then_padded)
    from PIL import ImageFile

    def no_decode(self):  # the padded file must pass without decoding: the cheap check is decisive
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert image_problem(padded) is None
    assert image_problem(trailer) == "decoded"  # ... while the trailer one needed a decode


def _photo_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(per_class):
            write_image(root / f"class_{c}" / f"{i}.png", rng, size=24, color=c)
    return root


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_broken_after_the_scan_stops_training_naming_it(tmp_path: Path, workers: int) -> None:
    root = _photo_folder(tmp_path / "imgs")
    dm = ImageDataModule("folder", root=root, image_size=16, batch_size=4, num_workers=workers, val_fraction=0.25)
    victim = Path(dm.data.splits["train"].items[1])  # scanned: fine
    _corrupt(victim)
    with pytest.raises(UnreadableImage) as e:
        for _ in dm.train_dataloader():
            pass
    msg = str(e.value)
    assert isinstance(e.value, FineTuneError) and "\n" not in msg and "Traceback" not in msg
    assert msg.startswith(f"cannot decode image '{victim}': image file is truncated")
    assert "on_bad_image=skip" in msg
    assert [p for p, _ in dm.skipped_during_training] == [victim]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_replaces_a_file_broken_after_the_scan_and_counts_it(tmp_path: Path, workers: int) -> None:
    root = _photo_folder(tmp_path / "imgs", per_class=8)
    dm = ImageDataModule("folder", root=root, image_size=16, batch_size=4, num_workers=workers, val_fraction=0.25,
                         on_bad_image="skip")
    train, val = dm.data.splits["train"], dm.data.splits["val"]
    assert dm.bad_images == [] and (len(train), len(val)) == (12, 4)
    broken = [Path(train.items[3]), Path(val.items[0])]
    for p in broken:
        _corrupt(p)
    for _ in range(2):  # two epochs: persistent workers keep counting
        sizes = [len(x) for x, _ in dm.train_dataloader()]
        assert sizes == [4, 4, 4]  # shapes kept: the broken file is replaced, not dropped
    assert [len(y) for _, y in dm.val_dataloader()] == [4]
    skipped = dm.skipped_during_training
    assert [p for p, _ in skipped] == sorted(broken)
    assert all("truncated" in why.lower() for _, why in skipped)  # the scan's reason, found again
    # The replacement is the next item of the split, image and label.
    ds = dm.eval_dataset("train")
    assert ds[3][1] == train.labels[4] and (ds[3][0] == ds[4][0]).all()
    assert ds.failed_items() == [train.items[3]]


def test_skip_gives_up_on_a_split_that_will_not_decode(tmp_path: Path) -> None:
    root = _photo_folder(tmp_path / "imgs", per_class=3)
    dm = ImageDataModule("folder", root=root, image_size=16, batch_size=2, num_workers=0, val_fraction=0.34,
                         on_bad_image="skip")
    assert len(dm.data.splits["train"]) == 3
    for p in dm.data.splits["train"].items:
        _corrupt(Path(p))
    with pytest.raises(FineTuneError, match=r"image '.*' and the 2 after it cannot be decoded"):
        next(iter(dm.train_dataloader()))


def _fit(dm: ImageDataModule, tmp_path: Path) -> None:
    from finetune import FineTuneModule

    model = FineTuneModule("test_resnet", num_classes=2, pretrained=False, freeze="none", lr=1e-3)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_training_with_a_file_broken_after_the_scan(tmp_path: Path, policy: str) -> None:
    root = _photo_folder(tmp_path / "imgs", per_class=8)  # 12 train images: full batches of 4 (BatchNorm)
    dm = ImageDataModule("folder", root=root, image_size=32, batch_size=4, num_workers=1, val_fraction=0.25,
                         on_bad_image=policy)
    victim = Path(dm.data.splits["train"].items[5])
    _corrupt(victim)
    if policy == "error":
        with pytest.raises(FineTuneError, match=rf"^cannot decode image '{victim}': image file is truncated"):
            _fit(dm, tmp_path)
    else:
        _fit(dm, tmp_path)
        assert [p for p, _ in dm.skipped_during_training] == [victim]


# --- duplicates across splits (item 8) ---


def _split_folder(root: Path) -> tuple[Path, Path, Path]:
    """``root/train|val|test/class_c`` with two copies: val's of a train file, test's of a val file."""
    write_folder(root, classes=2, per_class=4, splits=("train", "val", "test"), size=16)
    val_copy, test_copy = root / "val" / "class_0" / "copy.png", root / "test" / "class_1" / "copy.png"
    shutil.copy(root / "train" / "class_0" / "2.png", val_copy)
    shutil.copy(root / "val" / "class_1" / "3.png", test_copy)
    return root, val_copy, test_copy


def test_copies_across_splits_are_found_by_content(tmp_path: Path) -> None:
    root, val_copy, test_copy = _split_folder(tmp_path / "imgs")
    found = find_duplicates(folder(root))
    assert [(d.split, d.path, d.same_split, d.same_path) for d in found] == [
        ("val", str(val_copy), "train", str(root / "train" / "class_0" / "2.png")),
        ("test", str(test_copy), "val", str(root / "val" / "class_1" / "3.png")),
    ]
    assert find_duplicates(folder(root / "train")) == []  # one split: copies within it are no leak


def test_on_duplicate_warn_error_drop(tmp_path: Path) -> None:
    root, val_copy, test_copy = _split_folder(tmp_path / "imgs")
    warn = ImageDataModule("folder", root=root, num_workers=0)
    assert {k: len(v) for k, v in warn.data.splits.items()} == {"train": 8, "val": 9, "test": 9}
    assert len(warn.duplicates) == 2
    assert [n for n in warn.data.notes if "byte-identical" in n] == [
        f"warning: 2 val/test image(s) are byte-identical to images of an earlier split (first: val '{val_copy}' = "
        f"train '{root / 'train' / 'class_0' / '2.png'}'); scores on them are optimistic "
        "(data.on_duplicate=drop leaves them out)"
    ]
    with pytest.raises(FineTuneError, match=rf"^val image is byte-identical to a train image: val '{val_copy}' = "
                                            r"train '.*2.png' \(2 such image\(s\)"):
        _ = ImageDataModule("folder", root=root, num_workers=0, on_duplicate="error").data
    drop = ImageDataModule("folder", root=root, num_workers=0, on_duplicate="drop")
    splits = drop.data.splits
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 8, "test": 8}
    assert val_copy not in splits["val"].items and test_copy not in splits["test"].items
    assert splits["train"].items == warn.data.splits["train"].items  # never dropped from train
    assert "left out 2 val/test image(s) byte-identical to images of an earlier split" in drop.data.notes[-1]
    with pytest.raises(FineTuneError, match="on_duplicate must be one of warn, error, drop, got 'maybe'"):
        ImageDataModule("folder", root=root, on_duplicate="maybe")


def test_duplicates_among_arrays_and_a_file_listed_in_two_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(6)]
    data = DataSplits("arrays", ["a", "b"], {
        "train": Split(imgs[:4], np.array([0, 1, 0, 1])),
        "val": Split([imgs[4], imgs[1].copy()], np.array([0, 1])),
        "test": Split([imgs[5], imgs[4].copy(), imgs[0][::-1, ::-1][::-1, ::-1]], np.array([1, 0, 0])),
    })
    kept, found = check_duplicates(data, "drop")
    assert [str(d) for d in found] == ["val image #1 = train image #1", "test image #1 = val image #0",
                                       "test image #2 = train image #0"]
    assert [len(s) for s in kept.splits.values()] == [4, 1, 1]
    assert np.array_equal(kept.splits["test"].items[0], imgs[5])
    # The CSV's own path check and the content check both see a file listed twice.
    for c in range(2):
        write_image(tmp_path / f"{c}.png", rng, size=8, color=c)
        write_image(tmp_path / f"{c}b.png", rng, size=8, color=c)
    (tmp_path / "l.csv").write_text("path,label,split\n0.png,a,train\n1.png,b,train\n0b.png,a,train\n"
                                    "1b.png,b,train\n0.png,a,val\n1b.png,b,val\n")
    assert [str(d) for d in find_duplicates(csv_source(tmp_path / "l.csv"))] == [
        f"val '{tmp_path / '0.png'}' = train '{tmp_path / '0.png'}'",
        f"val '{tmp_path / '1b.png'}' = train '{tmp_path / '1b.png'}'",
    ]


def test_the_default_digits_have_no_copies_across_splits() -> None:
    """Measured: no two of the 1,797 digits are byte-identical, so on_duplicate=warn changes nothing by default."""
    dm = ImageDataModule("digits", on_duplicate="error")
    assert dm.duplicates == [] and not any("byte-identical" in n for n in dm.data.notes)
    assert {k: len(v) for k, v in dm.data.splits.items()} == {"train": 1257, "val": 180, "test": 360}


# --- smaller (item 9) ---


def test_hidden_folders_are_not_trained_on(make_folder) -> None:
    root = make_folder(classes=2, per_class=4)
    rng = np.random.default_rng(3)
    hidden = write_image(root / "class_0" / ".ipynb_checkpoints" / "0-checkpoint.png", rng)
    dm = ImageDataModule("folder", root=root, num_workers=0, val_fraction=0.25)
    items = {Path(p) for s in dm.data.splits.values() for p in s.items}
    assert len(items) == 8 and hidden not in items
    assert "train: ignored 1 hidden file(s) or file(s) in hidden folders" in dm.data.notes


def test_csv_row_with_an_unquoted_comma_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        write_image(tmp_path / f"{name}.png", rng, size=8)
    (tmp_path / "l.csv").write_text("path,label,split\na.png,cat,train\nb.png,cat,train\n"
                                    "c.png,red, fox,train\nd.png,red fox,train\n")
    with pytest.raises(FineTuneError, match=r"^CSV file '.*l.csv' row 4 has 4 fields, its header 3 "
                                            r"\(path,label,split\): quote a value that holds a comma") as e:
        csv_source(tmp_path / "l.csv")
    assert "\n" not in str(e.value)
    # Quoted, it is one label; a trailing empty field (spreadsheet exports) is no extra value.
    (tmp_path / "l.csv").write_text('path,label,split\na.png,cat,train,\nb.png,cat,train\n'
                                    'c.png,"red, fox",train\nd.png,"red, fox",train\n')
    assert csv_source(tmp_path / "l.csv", val_fraction=0.5).classes == ["cat", "red, fox"]
