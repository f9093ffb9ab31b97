"""L2-SP (optim.l2sp): a pull toward the pretrained backbone, no plain weight decay on it, its own logged term."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import FineTuneModule
from finetune.config import compose
from finetune.errors import FineTuneError
from finetune.l2sp import L2SP

ALPHA = 0.5


def _module(alpha: float = ALPHA, freeze: str = "none", backbone: str = "test_resnet") -> FineTuneModule:
    return FineTuneModule(backbone, num_classes=3, pretrained=False, freeze=freeze, l2sp=alpha)


def _move(m: FineTuneModule, direction: dict[str, torch.Tensor], step: float) -> None:
    with torch.no_grad():
        for n, p in m.backbone.named_parameters():
            p.add_(step * direction[n])


def test_zero_at_the_pretrained_point_and_quadratic_in_the_distance() -> None:
    m = _module()
    assert m.l2sp(m.backbone).item() == 0.0
    g = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in m.backbone.named_parameters()}
    squared_norm = sum(d.pow(2).sum().item() for d in direction.values())
    values = []
    for total in (0.01, 0.02, 0.04):
        _move(m, direction, total - (values and values[-1][0] or 0.0))
        values.append((total, m.l2sp(m.backbone).item()))
    for t, v in values:
        assert math.isclose(v, ALPHA / 2 * t**2 * squared_norm, rel_tol=1e-3)
    assert math.isclose(values[1][1] / values[0][1], 4.0, rel_tol=1e-3)


def test_its_gradient_pulls_each_weight_back_to_its_start() -> None:
    m = _module()
    start = {n: p.detach().clone() for n, p in m.backbone.named_parameters()}
    _move(m, {n: torch.ones_like(p) for n, p in start.items()}, 0.1)
    m.l2sp(m.backbone).backward()
    for n, p in m.backbone.named_parameters():
        assert torch.allclose(p.grad, ALPHA * (p.detach() - start[n]), atol=1e-6), n


def test_only_what_trains_is_pulled_and_the_start_stays_out_of_checkpoints() -> None:
    m = _module(freeze="top_stages")
    trainable = {n for n, p in m.backbone.named_parameters() if p.requires_grad}
    assert set(m.l2sp.names) == trainable and 0 < len(trainable) < len(list(m.backbone.parameters()))
    assert not any("w0_" in k for k in m.state_dict())  # non-persistent: checkpoints hold the weights only
    assert m.l2sp(m.backbone).item() == 0.0


def _fit_groups(alpha: float) -> tuple[list[dict], dict[str, torch.Tensor]]:
    pl.seed_everything(0)
    m = _module(alpha)
    data = DataLoader(TensorDataset(torch.randn(12, 3, 32, 32), torch.arange(12) % 3), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, data)
    return trainer.optimizers[0].param_groups, dict(trainer.callback_metrics)


def test_weight_decay_is_off_for_the_backbone_only_and_the_term_is_logged() -> None:
    groups, metrics = _fit_groups(ALPHA)
    decayed = {g["name"]: g["weight_decay"] for g in groups if not g["name"].endswith("no_decay")}
    assert decayed["head"] == 0.01 and [v for k, v in decayed.items() if k.startswith("stage")] == [0.0] * (len(decayed) - 1)
    assert metrics["train/l2sp"].item() > 0  # after the first steps the backbone has left its start


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_bad_alpha_is_a_one_line_error(alpha: float) -> None:
    with pytest.raises(FineTuneError, match=r"^optim\.l2sp must be a finite number >= 0 \(0: off\), got "):
        _module(alpha)


def test_config_reaches_the_module() -> None:
    from finetune.builders import build_module

    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false", "optim.l2sp=0.25"])

    class Data:  # what build_module reads of a datamodule
        num_classes, classes, data_config = 3, ["a", "b", "c"], {}
        augment = compose([]).augment  # the mixing options come from it

    m = build_module(cfg, Data())  # type: ignore[arg-type]
    assert m.hparams.l2sp == 0.25 and m.l2sp.alpha == 0.25


def test_a_module_rebuilt_from_a_checkpoint_refuses_to_pull_toward_an_unknown_start() -> None:
    m = _module()
    penalty = L2SP(m.backbone, m.freeze_plan, ALPHA, start_known=False)
    with pytest.raises(FineTuneError, match="resume=RUN_DIR"):
        penalty(m.backbone)
