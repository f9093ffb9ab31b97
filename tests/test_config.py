"""Every option of every config group composes and builds its object; types are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from finetune.builders import build_callbacks, build_datamodule, build_logger
from finetune.config import CONF_DIR, compose, register_configs
from finetune.data.augment import build_ops
from finetune.data.sources import SOURCES
from finetune.heads import build_head
from finetune.strategies import STRATEGIES, get_strategy

# What some options need before they can be built (a required path, patterns to match).
NEEDS = {
    ("freeze", "patterns"): ["freeze.trainable=[blocks.*]"],
}


def options(group: str) -> list[str]:
    """The options ``group=NAME`` accepts: the ConfigStore's (from the registries) and conf/GROUP/*.yaml."""
    register_configs()
    stored = ConfigStore.instance().repo.get(group, {})
    names = {n.removesuffix(".yaml") for n in stored if not n.startswith("base_")}
    names |= {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    return sorted(names)


def test_every_group_has_its_options_from_the_registries() -> None:
    assert set(options("freeze")) == set(STRATEGIES)
    assert set(options("data")) == set(SOURCES)
    assert {"none", "light", "medium", "heavy"} == set(options("augment"))
    assert {"linear", "mlp"} <= set(options("head")) and {"adamw", "sgd"} <= set(options("optim"))
    assert {"default"} <= set(options("callbacks")) and {"csv", "tensorboard"} <= set(options("logger"))


@pytest.mark.parametrize("name", options("freeze"))
def test_freeze_options_build(name: str) -> None:
    cfg = compose([f"freeze={name}", *NEEDS.get(("freeze", name), [])])
    strategy = get_strategy(OmegaConf.to_container(cfg.freeze))
    assert type(strategy) is STRATEGIES[name] and strategy.name == name
    assert OmegaConf.to_object(cfg.freeze) == strategy  # the stored node is the strategy's own dataclass


@pytest.mark.parametrize("name", options("data"))
def test_data_options_compose_into_their_source_class(name: str) -> None:
    cfg = compose([f"data={name}"])
    source = OmegaConf.to_object(cfg.data)
    assert type(source) is SOURCES[name] and source.source == name


@pytest.mark.parametrize("overrides", [["data=digits"], ["data=photos", "data.per_class=4", "data.image_size=32"]])
def test_offline_data_options_build_their_datamodule(overrides: list[str]) -> None:
    dm = build_datamodule(compose(["backbone.name=test_resnet", *overrides]))
    assert dm.num_classes >= 2 and len(dm.data.splits["train"]) > 0


def test_folder_option_builds_on_a_folder(make_folder) -> None:
    root = make_folder(classes=2, per_class=5)
    dm = build_datamodule(compose(["data=folder", f"data.root={root}", "backbone.name=test_resnet"]))
    assert dm.classes == ["class_0", "class_1"] and sum(len(s) for s in dm.data.splits.values()) == 10


@pytest.mark.parametrize("name", options("augment"))
def test_augment_options_build_their_ops(name: str) -> None:
    cfg = compose([f"augment={name}"])
    ops = build_ops(OmegaConf.to_container(cfg.augment.ops))
    assert len(ops) == len(cfg.augment.ops)
    assert cfg.augment.no_aug == (name == "none")


@pytest.mark.parametrize("name", options("head"))
def test_head_options_build(name: str) -> None:
    head = build_head(OmegaConf.to_container(compose([f"head={name}"]).head), 8, 3)
    assert head(torch.randn(2, 8)).shape == (2, 3)


@pytest.mark.parametrize("name", options("optim"))
def test_optim_options_build_optimizer_and_scheduler(name: str) -> None:
    from hydra.utils import instantiate

    cfg = compose([f"optim={name}"])
    p = torch.nn.Parameter(torch.zeros(3))
    opt = instantiate(OmegaConf.to_container(cfg.optim.optimizer))([{"params": [p], "start_epoch": 0}], lr=cfg.optim.lr)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == cfg.optim.lr
    sched = instantiate(OmegaConf.to_container(cfg.optim.scheduler))(opt, total_steps=10, steps_per_epoch=5)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_options_build(name: str, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    built = build_callbacks(compose([f"callbacks={name}"]), tmp_path)
    assert built and all(isinstance(c, pl.Callback) for c in built)
    dirs = [c.dirpath for c in built if isinstance(c, pl.callbacks.ModelCheckpoint)]
    assert dirs and all(Path(d) == tmp_path / "checkpoints" for d in dirs)  # relative to the run directory


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_build(name: str, tmp_path: Path) -> None:
    logger = build_logger(compose([f"logger={name}"]), tmp_path)
    assert Path(logger.save_dir) == tmp_path


@pytest.mark.parametrize("overrides", [
    # optim.lr also takes 'find': its other values are checked before the run (test_lr_find).
    ["seed=x"], ["optim.backbone_lr_mult=fast"], ["data.batch_size=1.5"], ["freeze=gradual", "freeze.every_n_epochs=two"],
    ["backbone.pretrained=maybe"], ["advise.sample_size=many"],
])
def test_a_value_of_the_wrong_type_is_refused_at_compose_time(overrides: list[str]) -> None:
    with pytest.raises(Exception) as e:
        compose(overrides)
    assert isinstance(e.value.__cause__ or e.value, ValidationError), e.value


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options_build(name: str) -> None:
    from finetune.backbones import create_backbone

    cfg = compose([f"backbone={name}"])
    assert cfg.backbone.name == name and cfg.backbone.pretrained  # pretrained unless asked otherwise
    model = create_backbone(cfg.backbone.name, pretrained=False).model
    assert model.num_features > 0
