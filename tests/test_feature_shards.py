"""The feature cache under DDP without starting processes: each rank extracts every world-th image, the gather interleaves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import finetune.distributed as distributed
import finetune.features as features
from finetune import FeatureDataModule, FineTuneModule, ImageDataModule
from finetune.data.datamodule import ImageDataset
from finetune.data.sources import DataSplits, Split


def _images(n: int = 10) -> ImageDataModule:
    g = np.random.default_rng(0)
    train = Split(list(g.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)), np.arange(n) % 2)
    return ImageDataModule(DataSplits("tiny", ["a", "b"], {"train": train, "val": train.subset(np.arange(3))}),
                           image_size=16, augment="none", batch_size=4)


def test_each_rank_extracts_its_strided_shard_and_together_they_cover_the_split(monkeypatch) -> None:
    torch.manual_seed(0)
    module = FineTuneModule("test_resnet", pretrained=False, freeze="head_only", num_classes=2)
    whole = FeatureDataModule(_images(), module).dataset("train").tensors[0]  # one process: every row
    read: list[int] = []
    getitem = ImageDataset.__getitem__
    monkeypatch.setattr(ImageDataset, "__getitem__", lambda self, i: (read.append(i), getitem(self, i))[1])
    sent: dict[int, torch.Tensor] = {}
    world = 3
    for rank in range(world):
        read.clear()
        monkeypatch.setattr(features, "process_group_rank", lambda r=rank: (r, world))
        monkeypatch.setattr(features, "gather_strided", lambda rows, n, device, r=rank: sent.setdefault(r, rows)
                            .new_zeros((n, rows.shape[1])))
        FeatureDataModule(_images(), module).dataset("train")
        assert sorted(read) == list(range(rank, 10, world)), f"rank {rank} read other images"
        torch.testing.assert_close(sent[rank], whole[rank::world])  # the rows it contributes are the right ones
    assert sum(len(r) for r in sent.values()) == len(whole)


def test_a_split_smaller_than_the_world_is_extracted_whole_on_every_rank(monkeypatch) -> None:
    module = FineTuneModule("test_resnet", pretrained=False, freeze="head_only", num_classes=2)
    monkeypatch.setattr(features, "process_group_rank", lambda: (3, 4))
    monkeypatch.setattr(features, "gather_strided", lambda *a, **k: pytest.fail("nothing to gather"))
    assert len(FeatureDataModule(_images(), module).dataset("val").tensors[0]) == 3


@pytest.mark.parametrize("n, world, chunk", [(10, 3, 2), (9, 3, 100), (7, 2, 1)])
def test_gather_strided_interleaves_the_shards_back_into_split_order(monkeypatch, n, world, chunk) -> None:
    table = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    shards = [table[r::world] for r in range(world)]
    calls = []

    def all_gather(out: list[torch.Tensor], mine: torch.Tensor) -> None:  # what the other ranks would send
        k = len(calls)
        calls.append(mine)
        for r, shard in enumerate(shards):
            block = shard[k * chunk:(k + 1) * chunk]
            out[r].zero_()[: len(block)] = block

    monkeypatch.setattr(distributed, "process_group_rank", lambda: (0, world))
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    got = distributed.gather_strided(shards[0], n, chunk=chunk)
    assert torch.equal(got, table)
    assert len(calls) == -(-(-(-n // world)) // chunk)  # chunks of the longest shard
