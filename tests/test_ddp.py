"""Unfreezing under DDP (two CPU processes, gloo): every rank syncs the same parameters (Lightning #20340)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import FineTuneModule
from finetune.stage_groups import backbone_stages


class _Check(pl.Callback):
    """After each epoch: weights equal on both ranks; what changed is what the schedule unfroze."""

    def on_train_start(self, trainer: pl.Trainer, m: FineTuneModule) -> None:
        self.start = {n: p.detach().clone() for n, p in m.backbone.named_parameters()}

    def on_train_epoch_end(self, trainer: pl.Trainer, m: FineTuneModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in m.backbone.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
        top = set(backbone_stages(m.backbone)[-1].param_names)
        changed = {n for n, p in m.backbone.named_parameters() if not torch.equal(p.detach(), self.start[n])}
        if trainer.current_epoch == 0:
            assert changed == set(), "a frozen stage moved"
        else:
            assert changed and changed <= top, "only the unfrozen top stage may move"


def test_gradual_under_ddp_spawn(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.arange(32) % 3)
    m = FineTuneModule("test_resnet", num_classes=3, pretrained=False, freeze={"name": "gradual", "every_n_epochs": 1},
                       scheduler={"_target_": "finetune.optim.build_scheduler", "_partial_": True, "warmup_epochs": 0})
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[_Check()])
    trainer.fit(m, DataLoader(data, batch_size=8))
    assert trainer.state.finished


class _WholeTable(pl.Callback):
    """On each rank: the gathered feature table is the backbone's features of every image, in split order."""

    def on_train_start(self, trainer: pl.Trainer, m: FineTuneModule) -> None:
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
        table = trainer.datamodule.dataset("train").tensors[0]
        images = torch.stack([x for x, _ in trainer.datamodule.images.datasets["train"]])
        m.backbone.eval()
        with torch.no_grad():
            torch.testing.assert_close(table, m.forward_features(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two spawned interpreters: ~30 s on a loaded 2-core CPU
def test_cached_features_under_ddp_spawn_equal_one_process(tmp_path: Path) -> None:
    import numpy as np

    from finetune import FeatureDataModule, ImageDataModule
    from finetune.data.sources import DataSplits, Split

    g = np.random.default_rng(0)
    train = Split(list(g.integers(0, 255, (24, 16, 16, 3), dtype=np.uint8)), np.arange(24) % 3)
    data = DataSplits("tiny", ["a", "b", "c"], {"train": train, "val": train.subset(np.arange(7))})
    heads = []
    for devices, batch in ((1, 8), (2, 4)):  # the same global batch of 8
        pl.seed_everything(0, verbose=False)
        m = FineTuneModule("test_resnet", num_classes=3, pretrained=False, freeze="head_only",
                           optimizer={"_target_": "torch.optim.SGD", "_partial_": True},
                           scheduler={"_target_": "finetune.optim.build_scheduler", "_partial_": True,
                                      "warmup_epochs": 0})
        dm = FeatureDataModule(ImageDataModule(data, image_size=16, augment="none", batch_size=batch), m)
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=devices, logger=False,
                             strategy="ddp_spawn" if devices > 1 else "auto", enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[_WholeTable()] if devices > 1 else [])
        trainer.fit(m, datamodule=dm)
        assert trainer.state.finished
        heads.append({k: v.detach().clone() for k, v in m.head.state_dict().items()})
    assert any(not torch.equal(v, w) for v, w in zip(heads[0].values(), FineTuneModule(
        "test_resnet", num_classes=3, pretrained=False).head.state_dict().values())), "the head did not train"
    for k in heads[0]:
        torch.testing.assert_close(heads[1][k], heads[0][k], rtol=1e-4, atol=1e-5, msg=k)
