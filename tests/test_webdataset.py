"""data=webdataset: every sample once per epoch across ranks and workers, equal batches per rank, refusals, a run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

wds = pytest.importorskip("webdataset")

from finetune.data import StreamingDataModule  # noqa: E402
from finetune.data.shard_index import shard_plan  # noqa: E402
from finetune.errors import FineTuneError  # noqa: E402


def write_shards(root: Path, n: int, maxcount: int, prefix: str = "train") -> str:
    """``n`` 8x8 PNG samples whose label is their own index (so labels name samples), and classes.json."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(root / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0) as w:
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
            import io

            buf = io.BytesIO()
            img.save(buf, format="PNG")
            w.write({"__key__": f"s{i:05d}", "png": buf.getvalue(), "cls": i})
        shards = w.shard
    (root / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(n)]}))
    return str(root / f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


def rank_labels(monkeypatch: pytest.MonkeyPatch, urls: str, rank: int, world: int, split: str,
                batch_size: int = 3, **fields: str) -> tuple[list[int], int, int]:
    """Labels (= sample ids) one simulated rank's loader yields in an epoch, its batches, and its len()."""
    monkeypatch.setenv("RANK", str(rank))  # where webdataset's split_by_node looks first
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dm = StreamingDataModule("webdataset", urls=urls, val_fraction=0.25, num_workers=2, batch_size=batch_size,
                             image_size=8, shuffle_buffer=5, **fields)
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    batches = [y.tolist() for _, y in loader]
    return [i for b in batches for i in b], len(batches), len(loader)


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, monkeypatch, split):
    urls = write_shards(tmp_path / "shards", n=40, maxcount=5)  # 8 equal shards: 2 per (rank, worker)
    # train: val shards of their own, so train divides evenly; val: held out of the train shards by key hash.
    fields = {"val_urls": write_shards(tmp_path / "val", n=6, maxcount=5, prefix="val")} if split == "train" else {}
    seen, lengths = [], []
    for rank in (0, 1):
        labels, batches, length = rank_labels(monkeypatch, urls, rank, 2, split, **fields)
        assert batches == length
        seen += labels
        lengths.append(length)
    dm = StreamingDataModule("webdataset", urls=urls, val_fraction=0.25, image_size=8, **fields)
    expected = sorted(dm.data.splits[split].labels.tolist())
    assert len(expected) == (40 if split == "train" else len(set(expected))) and 0 < len(expected)
    counts = Counter(seen)
    assert sorted(counts) == expected and set(counts.values()) == {1}, "a sample missing or repeated"
    if split == "train":
        assert lengths[0] == lengths[1]


def test_uneven_shards_give_every_rank_the_same_batches_without_repeats(tmp_path, monkeypatch):
    urls = write_shards(tmp_path / "shards", n=41, maxcount=6)  # 7 shards, the last of 5: ranks get 4 and 3
    runs = [rank_labels(monkeypatch, urls, rank, 2, "train", batch_size=2) for rank in (0, 1)]
    assert runs[0][1] == runs[1][1] == runs[0][2]  # DDP: the same number of batches on every rank
    seen = runs[0][0] + runs[1][0]
    assert len(set(seen)) == len(seen)  # nothing twice; the poorer rank sets the length
    dm = StreamingDataModule("webdataset", urls=urls, val_fraction=0.25, num_workers=2, batch_size=2, image_size=8)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm.train_dataloader()
    dropped = len(dm.data.splits["train"]) - len(seen)
    assert dropped > 0 and any(f"DDP: {dropped} train sample(s)" in n for n in dm.data.notes)


def test_shard_plan_is_webdatasets_split_by_node_then_worker(monkeypatch):
    from webdataset.shardlists import split_by_node, split_by_worker

    for world, workers in ((2, 2), (3, 2), (2, 3)):
        for rank in range(world):
            for worker in range(workers):
                for k, v in {"RANK": rank, "WORLD_SIZE": world, "WORKER": worker, "NUM_WORKERS": workers}.items():
                    monkeypatch.setenv(k, str(v))
                assert shard_plan(7, rank, world, worker, workers) == list(split_by_worker(split_by_node(range(7))))


def test_shuffle_buffer_reorders_each_epoch(tmp_path):
    urls = write_shards(tmp_path / "shards", n=30, maxcount=30)
    dm = StreamingDataModule("webdataset", urls=urls, val_fraction=0.1, num_workers=0, batch_size=30,
                             image_size=8, shuffle_buffer=30)
    loader = dm.train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader._epoch = lambda epoch=epoch: epoch
        orders.append([y for _, b in loader for y in b.tolist()])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    assert orders[0] != sorted(orders[0])


def test_what_needs_listed_images_is_refused_in_one_line(tmp_path):
    from finetune.data import ImageDataModule

    urls = write_shards(tmp_path / "shards", n=10, maxcount=5)
    with pytest.raises(FineTuneError, match="streams its shards"):
        ImageDataModule("webdataset", urls=urls).data
    with pytest.raises(FineTuneError, match="data.sampler=weighted"):
        StreamingDataModule("webdataset", urls=urls, sampler="weighted")
    with pytest.raises(FineTuneError, match="does not exist"):
        StreamingDataModule("webdataset", urls=str(tmp_path / "nothing-{0..3}.tar")).data
    (tmp_path / "shards" / "classes.json").unlink()
    with pytest.raises(FineTuneError, match="classes.json' does not exist"):
        StreamingDataModule("webdataset", urls=urls).data


def test_cache_features_true_is_refused(tmp_path):
    from finetune.config import compose
    from finetune.train import train

    urls = write_shards(tmp_path / "shards", n=10, maxcount=5)
    cfg = compose(["data=webdataset", f"data.urls='{urls}'", "backbone.name=test_resnet", "backbone.pretrained=false",
                   "freeze=head_only", "augment=none", "cache_features=true", "data.image_size=8"])
    with pytest.raises(FineTuneError, match="cache_features=true is not possible: data=webdataset streams"):
        train(cfg, tmp_path / "run")
