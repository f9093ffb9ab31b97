"""Unfreezing under DDP (two CPU processes, gloo): every rank syncs the same parameters (Lightning #20340)."""

from __future__ import annotations

from pathlib import Path

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
