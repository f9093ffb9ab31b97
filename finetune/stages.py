"""``python -m finetune.stages``: a backbone's stages, their sizes, and what each freeze strategy trains."""

from __future__ import annotations

from finetune.stage_groups import backbone_stages

__all__ = ["describe", "main"]


def describe(backbone_name: str, freeze_overrides: dict | None = None, epochs: int = 10) -> str:
    """A table of ``backbone_name``'s stages and what each freeze strategy trains.

    Args:
        backbone_name: timm model name.
        freeze_overrides: values of ``n``, ``every_n_epochs``, ``unfreeze_at_epoch`` to show.
        epochs: training length, for when ``gradual`` and ``lp_ft`` unfreeze.
    """
    import timm

    from finetune.backbones import check_backbone_name
    from finetune.freezing import FreezePlan, FreezeSpec

    check_backbone_name(backbone_name)
    model = timm.create_model(backbone_name, pretrained=False, num_classes=0)
    stages = backbone_stages(model)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(sizes.values())
    o = freeze_overrides or {}
    n, every, at = int(o.get("n", 2)), int(o.get("every_n_epochs", 1)), int(o.get("unfreeze_at_epoch", 2))
    specs = {
        f"top_stages n={n}": FreezeSpec("top_stages", n=n),
        f"bottom_stages n={n}": FreezeSpec("bottom_stages", n=n),
        f"gradual every={every}": FreezeSpec("gradual", every_n_epochs=every),
        f"lp_ft at={at}": FreezeSpec("lp_ft", unfreeze_at_epoch=at),
    }
    plans = {k: FreezePlan.build(model, s) for k, s in specs.items()}
    lines = [f"{backbone_name}: {len(stages)} stages, {total:,} backbone parameters (head not included)", ""]
    header = f"{'stage':>5}  {'label':<28} {'params':>12}  " + "  ".join(f"{k:>20}" for k in specs)
    lines += [header, "-" * len(header)]
    for st in stages:
        cells = []
        for k, plan in plans.items():
            start = plan.start_epoch.get(st.param_names[0]) if st.param_names else None
            if specs[k].name in ("gradual", "lp_ft"):
                cells.append("never" if start is None or start >= epochs else f"from epoch {start}")
            else:
                cells.append("train" if start == 0 else "frozen")
        count = sum(sizes[p] for p in st.param_names)
        lines.append(f"{st.index:>5}  {st.label:<28} {count:>12,}  " + "  ".join(f"{c:>20}" for c in cells))
    lines.append("")
    lines.append("backbone parameters that train (at the last of %d epochs for gradual/lp_ft):" % epochs)
    lines.append(f"  none: {total:,}   head_only: 0")
    for k, plan in plans.items():
        trained = sum(sizes[p] for p in sizes if plan.trains(p, epochs - 1))
        lines.append(f"  {k}: {trained:,} ({100 * trained / max(1, total):.1f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune.stages [backbone=NAME | backbone.name=NAME] [freeze.n=N] [trainer.max_epochs=E]``."""
    import sys

    from finetune.config import compose
    from finetune.errors import FineTuneError

    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose(args)
        print(describe(cfg.backbone.name, dict(cfg.freeze), int(cfg.trainer.max_epochs)))
    except FineTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
