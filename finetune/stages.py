"""``python -m finetune.stages``: a backbone's stages, their sizes, and what each freeze strategy trains.

The strategies are those of the registry (:data:`finetune.strategies.STRATEGIES`): a new
strategy shows up here without a change. ``freeze.KEY=VALUE`` sets that option in every
strategy that has it (``freeze.n=1`` for both ``top_stages`` and ``bottom_stages``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

from finetune.errors import FineTuneError, run_command
from finetune.stage_groups import backbone_stages
from finetune.strategies import STRATEGIES, FreezeStrategy

__all__ = ["describe", "main", "strategies_with"]


def strategies_with(options: Mapping[str, Any]) -> dict[str, FreezeStrategy]:
    """Every registered strategy that can be built from its defaults plus the ``options`` it takes."""
    from omegaconf import OmegaConf

    out = {}
    for name, cls in STRATEGIES.items():
        own = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in options.items() if k in own and k != "name"}
        try:  # OmegaConf converts "1" to the field's int, and refuses "two" in one line
            out[name] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), mine))
        except FineTuneError:  # e.g. patterns without patterns: nothing to show
            continue
    unknown = sorted(set(options) - {f.name for cls in STRATEGIES.values() for f in dataclasses.fields(cls)})
    if unknown:
        raise FineTuneError(f"no freeze strategy has option(s) {unknown}")
    return out


def describe(backbone_name: str, freeze_options: Mapping[str, Any] | None = None, epochs: int = 10) -> str:
    """A table of ``backbone_name``'s stages and what each registered freeze strategy trains.

    Args:
        backbone_name: timm model name.
        freeze_options: strategy options to show (``n``, ``every_n_epochs``, ...).
        epochs: training length, for when unfreezing schedules reach each stage.
    """
    import timm

    from finetune.backbones import check_backbone_name
    from finetune.freezing import FreezePlan

    check_backbone_name(backbone_name)
    model = timm.create_model(backbone_name, pretrained=False, num_classes=0)
    stages = backbone_stages(model)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(sizes.values())
    strategies = {s.label(): s for s in strategies_with(freeze_options or {}).values()}
    # A strategy that changes the backbone (lora's adapters) is shown on its own copy of it.
    models = {k: s.adapt(copy.deepcopy(model)) if type(s).adapt is not FreezeStrategy.adapt else model
              for k, s in strategies.items()}
    plans = {k: FreezePlan.build(models[k], s) for k, s in strategies.items()}
    width = {k: max(12, len(k)) for k in plans}
    lines = [f"{backbone_name}: {len(stages)} stages, {total:,} backbone parameters (head not included)", ""]
    header = f"{'stage':>5}  {'label':<28} {'params':>12}  " + "  ".join(f"{k:>{width[k]}}" for k in plans)
    lines += [header, "-" * len(header)]
    for st in stages:
        cells = []
        for k, plan in plans.items():
            starts = [plan.start_epoch.get(n) for n in plan.stages[st.index].param_names]
            on = [s for s in starts if s is not None]
            start = min(on) if on else None
            part = " (part)" if on and len(on) < len(starts) else ""  # bitfit, norm, lora: a kind of parameter
            if strategies[k].is_dynamic:
                cells.append("never" if start is None or start >= epochs else f"from epoch {start}{part}")
            else:
                cells.append(f"train{part}" if start == 0 else "frozen")
        count = sum(sizes[p] for p in st.param_names)
        lines.append(f"{st.index:>5}  {st.label:<28} {count:>12,}  " + "  ".join(f"{c:>{width[k]}}" for k, c in zip(plans, cells)))
    lines += ["", f"backbone parameters that train (at the last of {epochs} epochs for schedules that unfreeze):"]
    for k, plan in plans.items():
        trained = sum(p.numel() for n, p in models[k].named_parameters() if plan.trains(n, epochs - 1))
        lines.append(f"  {k}: {trained:,} ({100 * trained / max(1, total):.1f}%)")
    return "\n".join(lines)


def _stages(args: list[str]) -> None:
    from omegaconf import OmegaConf

    from finetune.config import compose

    # freeze.KEY=VALUE applies to every strategy that has KEY, so it is not composed into one freeze option.
    # Values parsed as YAML, as Hydra's would be: freeze.target_modules=[qkv,proj] is a list.
    options = OmegaConf.to_container(OmegaConf.from_dotlist(
        [a.lstrip("+").removeprefix("freeze.") for a in args if a.lstrip("+").startswith("freeze.")]))
    cfg = compose([a for a in args if not a.lstrip("+").startswith("freeze.")])
    print(describe(cfg.backbone.name, options, int(cfg.trainer.max_epochs)))


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune.stages [backbone=NAME | backbone.name=NAME] [freeze.n=N] [trainer.max_epochs=E]``."""
    from finetune.help import print_help_if_asked

    if print_help_if_asked("stages", argv):  # before composing: Hydra's grammar rejects --help
        return
    run_command(_stages, argv)


if __name__ == "__main__":
    main()
