"""The course's measures of a network (finetune.layer_size, python -m finetune.size): LeNet-5's table to the
unit, parameter sums that match the model's, what a freeze strategy keeps and costs, and the run's record."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
from torch import nn

from finetune.freezing import FreezePlan
from finetune.layer_size import freeze_cost, size_table, stage_labels, stage_sums, trainable_names
from finetune.size import main
from finetune.strategies import get_strategy

from conftest import TINY_MODELS

# The course's LeNet-5 table: (layer, type, units, connections, weights), weights without biases.
LENET5 = [
    ("C1", "convolution", 4_704, 117_600, 150),
    ("S2", "pooling", 1_176, 4_704, 0),
    ("C3", "convolution", 1_600, 240_000, 2_400),
    ("S4", "pooling", 400, 1_600, 0),
    ("F5", "fully connected", 120, 48_000, 48_000),
    ("F6", "fully connected", 84, 10_080, 10_080),
    ("output", "fully connected", 10, 840, 840),
]


def lenet5() -> nn.Sequential:
    """LeNet-5 as the course draws it: 32x32 input, C3 connected to all six of S2's maps, F5 to S4's 5x5x16."""
    return nn.Sequential(OrderedDict(
        C1=nn.Conv2d(1, 6, 5), a1=nn.Tanh(), S2=nn.AvgPool2d(2),
        C3=nn.Conv2d(6, 16, 5), a3=nn.Tanh(), S4=nn.AvgPool2d(2), flat=nn.Flatten(),
        F5=nn.Linear(400, 120), a5=nn.Tanh(), F6=nn.Linear(120, 84), a6=nn.Tanh(), output=nn.Linear(84, 10),
    ))


def run_model(name: str, num_classes: int = 10) -> nn.Sequential:
    """Backbone and head named as FineTuneModule names them."""
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(backbone.num_features, num_classes)))


def test_lenet5_reproduces_the_course_table() -> None:
    table = size_table(lenet5(), 32)
    assert [(r.name, r.kind, r.units, r.connections, r.weights) for r in table.layers] == LENET5
    assert [r.biases for r in table.layers] == [6, 0, 16, 0, 120, 84, 10]  # apart: the course leaves them out
    assert table.flop_counter_macs == 117_600 + 240_000 + 48_000 + 10_080 + 840  # torch's count of the same pass


def test_grouped_convolution_divides_weights_and_connections_by_groups() -> None:
    table = size_table(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8)), 10)
    (conv,) = table.layers
    assert (conv.units, conv.weights, conv.connections) == (800, 72, 7_200)  # 10·10·3²·(8/8)·8


@pytest.mark.parametrize("name", TINY_MODELS)
def test_weights_biases_and_other_parameters_add_up_to_the_model(name: str) -> None:
    model = run_model(name)
    size = timm.data.resolve_model_data_config(model.backbone)["input_size"][-1]
    table = size_table(model, size)
    weights, biases, other = table.total("weights"), table.total("biases"), table.total("other_params")
    assert weights + biases + other == sum(p.numel() for p in model.parameters())
    # FlopCounterMode, from the same forward pass, counts the multiply-adds of every conv and linear layer.
    assert table.flop_counter_macs == table.total("connections", ["convolution", "fully connected"])


def test_resnet_norm_parameters_are_the_batchnorms() -> None:
    model = run_model("test_resnet")
    table = size_table(model, 64)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert table.total("other_params", ["norm"]) == bn > 0
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert table.total("weights", ["convolution"]) == sum(m.weight.numel() for m in convs)
    sums = stage_sums(table, stage_labels(model))
    assert [s.name for s in sums][-1] == "head" and sum(s.units for s in sums) == table.total("units")


def _cost(model: nn.Sequential, table, freeze: str | dict, cached: bool = False):
    plan = FreezePlan.build(model.backbone, get_strategy(freeze))
    return freeze_cost(table, trainable_names(model, plan, 0), cached)


def test_freezing_keeps_only_the_units_after_the_first_trainable_layer() -> None:
    model = run_model("test_resnet")
    table = size_table(model, 64)
    head = table.layers[-1]
    assert head.name == "head"
    backbone = table.total("connections") - head.connections

    none = _cost(model, table, "none")
    assert none.units_kept == table.total("units") and none.trainable_weights == table.total("weights")
    assert none.train_macs == none.full_macs == 3 * table.total("connections")

    head_only = _cost(model, table, "head_only")
    assert (head_only.units_kept, head_only.trainable_weights) == (head.units, head.weights)
    assert head_only.train_macs == backbone + 3 * head.connections and head_only.once_macs == 0

    cached = _cost(model, table, "head_only", cached=True)
    assert (cached.train_macs, cached.once_macs) == (3 * head.connections, backbone)

    top = _cost(model, table, {"name": "top_stages", "n": 1})
    by_stage = {s.name: s for s in stage_sums(table, stage_labels(model))}
    assert top.units_kept == by_stage["layer4.0"].units + head.units
    assert top.trainable_weights == by_stage["layer4.0"].weights + head.weights

    # Trainable BatchNorm in the stem: backward reaches back to it, past every layer but the first conv.
    bn = _cost(model, table, {"name": "head_only", "train_bn": True})
    assert bn.units_kept == table.total("units") - table.layers[0].units
    assert bn.trainable_weights == head.weights


def test_command_prints_the_table_and_the_freeze(capsys: pytest.CaptureFixture[str]) -> None:
    main(["backbone.name=test_resnet", "data.image_size=32", "freeze=head_only", "augment=none", "num_classes=3"])
    out = capsys.readouterr().out
    assert "test_resnet at 32 px" in out and "backbone.layer4.0.conv1" in out
    assert "freeze=head_only with cached features:" in out
    assert "units kept for backward    3 of" in out  # the head's 3 outputs only
    main(["--help"])
    assert "python -m finetune.size" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["backbone.name=resnet5O"], "error: unknown backbone 'resnet5O'"),
    (["backbone.name=test_resnet", "data.image_size=0"], "error: data.image_size must be at least 1, got 0"),
    (["backbone.name=test_resnet", "num_classes=none"], "error: num_classes must be a positive integer"),
])
def test_bad_input_is_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1


def test_run_records_its_size(tmp_path: Path, make_folder, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.config import compose
    from finetune.train import train

    root = make_folder(classes=3, per_class=4, splits=("train", "val"))
    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false", "data=folder", f"data.root={root}",
                   "data.image_size=32", "data.num_workers=0", "freeze=head_only", "augment=none",
                   "trainer.max_epochs=1", "trainer.enable_progress_bar=false"])
    m = train(cfg, tmp_path)
    table = size_table(run_model("test_resnet", 3), 32)
    head = table.layers[-1]
    assert m["size"] == json.loads((tmp_path / "metrics.json").read_text())["size"]
    assert m["size"]["weights"] == table.total("weights") and m["size"]["units"] == table.total("units")
    assert (m["size"]["trainable_weights"], m["size"]["units_kept_for_backward"]) == (head.weights, 3)
    # head_only on unaugmented images trains on cached features: the backbone runs once, not each epoch.
    assert m["cached_features"] and m["size"]["train_multiply_adds_per_image"] == 3 * head.connections
    assert "size        units" in capsys.readouterr().out


def test_lora_adapters_are_layers_of_their_own_and_only_they_train_in_the_backbone() -> None:
    strategy = get_strategy("lora")
    model = run_model("test_vit")
    model.backbone = strategy.adapt(model.backbone)
    table = size_table(model, 64)
    adapters = [r for r in table.layers if ".lora_" in r.name]
    head = table.layers[-1]
    cost = _cost(model, table, "lora")
    assert adapters and cost.trainable_weights == sum(r.weights for r in adapters) + head.weights
    assert table.flop_counter_macs == table.total("connections", ["convolution", "fully connected"])
