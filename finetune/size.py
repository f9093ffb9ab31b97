"""``python -m finetune.size``: the course's table (units, connections, weights) of a run's network, per layer
and per stage, at the run's image size, and what its freeze strategy trains, keeps and costs.

The measuring is :mod:`finetune.layer_size` (usable without Hydra); this module composes the run's
config, builds its backbone and head (random weights: they do not change sizes) and prints.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from finetune.data.augment import mixing_options
from finetune.errors import FineTuneError
from finetune.freezing import FreezePlan
from finetune.layer_size import (MULTIPLY, FreezeCost, LayerSize, SizeTable, freeze_cost, size_table, stage_labels,
                                 stage_sums, trainable_names)

__all__ = ["main", "render"]

NUM_CLASSES = 10  # the head's classes when num_classes=N is not given (the default data, digits, has 10)


def _rows(rows: list[LayerSize], first: str) -> list[str]:
    w = max(len(first), *(len(r.name) for r in rows))
    lines = [f"{first:<{w}}  {'type':<15} {'units':>13} {'connections':>15} {'weights':>13}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        weights = f"{r.weights:,}" if r.kind in (*MULTIPLY, "stage") else ""
        kind = "" if r.kind == "stage" else r.kind
        lines.append(f"{r.name:<{w}}  {kind:<15} {r.units:>13,} {r.connections:>15,} {weights:>13}")
    return lines


def _ratio(part: int, whole: int) -> str:
    return f"{part:,} of {whole:,} ({100 * part / max(1, whole):.1f}%)"


def render(table: SizeTable, labels: Mapping[str, str], costs: Mapping[str, FreezeCost], epochs: int) -> list[str]:
    """The course's table per layer and per stage, the totals, and each freeze cost of ``costs``."""
    course = [r for r in table.layers if r.kind not in ("norm", "other")]
    lines = [*_rows(course, "layer"), "", *_rows(stage_sums(table, labels), "stage"), ""]
    w, b, n = table.total("weights"), table.total("biases"), table.total("other_params", ["norm"])
    macs = table.total("connections", MULTIPLY)
    lines += [f"units {table.total('units'):,}   weights {w:,}   connections {table.total('connections'):,}",
              f"parameters {table.params:,} = weights {w:,} + biases {b:,} + norm layers {n:,}"
              + (f" + others (embeddings, ...) {table.params - w - b - n:,}" if table.params - w - b - n else ""),
              f"FlopCounterMode: {table.flop_counter_macs:,} multiply-adds; the conv and linear connections: {macs:,}"]
    if table.flop_counter_macs != macs:
        lines.append("  (the difference: products without weights, e.g. attention: not in the course's table)")
    for label, c in costs.items():
        lines += ["", f"{label}:", f"  trainable weights          {_ratio(c.trainable_weights, c.weights)}",
                  f"  units kept for backward    {_ratio(c.units_kept, c.units)}",
                  f"  add-multiplies per image   {c.train_macs:,} per epoch "
                  f"({c.train_macs / max(1, c.full_macs):.3g}x of training everything, {c.full_macs:,})"]
        if c.once_macs:
            lines.append(f"  cached features            + {c.once_macs:,} once per image of the dataset "
                         f"(over {epochs} epochs: {c.macs_per_image(epochs) / max(1, c.full_macs):.3g}x)")
    return lines


def _size(args: list[str]) -> None:
    from collections import OrderedDict

    import timm
    from omegaconf import OmegaConf

    from finetune.backbones import create_backbone
    from finetune.config import compose
    from finetune.heads import build_head
    from finetune.strategies import get_strategy

    # The head's width is the data's class count, which only loading the data tells: an option of its own.
    classes = [a.partition("=")[2] for a in args if a.startswith("num_classes=")]
    if classes and not (classes[-1].isdigit() and int(classes[-1]) >= 1):
        raise FineTuneError(f"num_classes must be a positive integer, got '{classes[-1]}'")
    num_classes = int(classes[-1]) if classes else NUM_CLASSES
    cfg = compose([a for a in args if not a.startswith("num_classes=")])
    if cfg.data.image_size is not None and cfg.data.image_size < 1:
        raise FineTuneError(f"data.image_size must be at least 1, got {cfg.data.image_size}")
    strategy = get_strategy(OmegaConf.to_container(cfg.freeze))
    timm_model = create_backbone(cfg.backbone.name, pretrained=False).model  # weights do not change sizes
    timm_model.reset_classifier(0)
    image_size = cfg.data.image_size or timm.data.resolve_model_data_config(timm_model)["input_size"][-1]
    head = build_head(OmegaConf.to_container(cfg.head), timm_model.num_features, num_classes)
    backbone = strategy.adapt(timm_model)  # as FineTuneModule: freeze=lora's adapters are layers too
    model = nn.Sequential(OrderedDict(backbone=backbone, head=head))
    plan = FreezePlan.build(backbone, strategy)
    table = size_table(model, int(image_size))
    epochs = int(cfg.trainer.max_epochs)
    # As finetune.features decides it: a backbone frozen throughout, on unaugmented, unmixed images.
    cached = (plan.backbone_frozen_throughout and cfg.augment.no_aug and mixing_options(cfg.augment) is None
              and str(cfg.cache_features).lower() != "false")
    shown = sorted({0, epochs - 1}) if strategy.is_dynamic else [0]
    costs = {f"freeze={strategy.label()}" + (f" at epoch {e}" if strategy.is_dynamic else "")
             + (" with cached features" if cached else ""): freeze_cost(table, trainable_names(model, plan, e), cached)
             for e in shown}
    print(f"{cfg.backbone.name} at {image_size} px (batch 1), head {cfg.head._target_.rsplit('.', 1)[-1]} "
          f"to {num_classes} classes")
    print("\n".join(render(table, stage_labels(model), costs, epochs)))


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune.size [backbone.name=NAME] [data.image_size=N] [freeze=STRATEGY] [num_classes=N]``."""
    from finetune.errors import run_command
    from finetune.help import print_help_if_asked

    if print_help_if_asked("size", argv):  # before composing: Hydra's grammar rejects --help
        return
    run_command(_size, argv)


if __name__ == "__main__":
    main()
