"""python -m finetune.shard: any source to shards (same samples, input untouched), then a run from the shards."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile

import pytest

pytest.importorskip("webdataset")

from finetune.shard import main  # noqa: E402


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_folder_to_shards_then_one_epoch_from_them(make_folder, tmp_path, capsys):
    from finetune.config import compose
    from finetune.data import ImageDataModule
    from finetune.train import train

    root = make_folder(classes=3, per_class=6, splits=("train", "val"))
    before = _digest(root)
    out = tmp_path / "shards"
    main(["data=folder", f"data.root={root}", f"out={out}", "shard.maxcount=5"])
    assert _digest(root) == before  # the input is only read
    record = json.loads((out / "classes.json").read_text())
    source = ImageDataModule("folder", root=root).data
    assert record["classes"] == source.classes
    for name, split in source.splits.items():
        members = [m for p in sorted(out.glob(f"{name}-*.tar")) for m in tarfile.open(p).getnames()]
        assert record["splits"][name]["samples"] == len(split) == sum(m.endswith(".png") for m in members)
    # The files' own bytes, not re-encoded.
    with tarfile.open(out / "train-000000.tar") as tar:
        first = tar.extractfile(next(m for m in tar if m.name.endswith(".png"))).read()
    assert hashlib.md5(first).hexdigest() in set(before.values())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    overrides = re.findall(r"(\S+)='([^']+)'", line)  # the printed command: data.urls='...' data.val_urls='...'
    assert [k for k, _ in overrides] == ["data.urls", "data.val_urls"]

    cfg = compose(["data=webdataset", *[f"{k}='{v}'" for k, v in overrides], "backbone.name=test_resnet",
                   "backbone.pretrained=false", "trainer.max_epochs=1", "data.image_size=16", "data.batch_size=4",
                   "data.num_workers=0"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["split_sizes"] == {"train": 18, "val": 18}
    assert metrics["epochs"] == 1 and "val_acc" in metrics and not metrics["cached_features"]


def test_in_memory_source_is_png_encoded_with_every_sample(tmp_path):
    from finetune.data.sources import digits

    main(["data=digits", f"out={tmp_path / 'digits'}", "shard.maxcount=500"])
    record = json.loads((tmp_path / "digits" / "classes.json").read_text())
    sizes = {k: len(v) for k, v in digits().splits.items()}
    assert {k: v["samples"] for k, v in record["splits"].items()} == sizes
    assert record["splits"]["train"]["shards"] == -(-sizes["train"] // 500)
    with tarfile.open(tmp_path / "digits" / "test-000000.tar") as tar:
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"png", "cls"}


def test_a_non_empty_out_is_refused_in_one_line(make_folder, tmp_path, capsys):
    root = make_folder(classes=2, per_class=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["data=folder", f"data.root={root}", f"out={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out ") and "not an empty folder" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
