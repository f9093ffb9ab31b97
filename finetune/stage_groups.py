"""A backbone's stages, from the model's own description (timm's ``group_matcher``).

Stage 0 is the stem; the last stage includes whatever timm puts before the
classifier (EfficientNet's conv_head, ViT's final norm). The same code serves every
timm family, with no per-architecture tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Stage", "backbone_stages"]


@dataclass(frozen=True)
class Stage:
    """One stage: its index, a readable label and the names of its parameters."""

    index: int
    label: str
    param_names: tuple[str, ...]


def _label(names: list[str]) -> str:
    roots: list[str] = []
    for n in names:
        parts = n.split(".")
        root = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if root not in roots:
            roots.append(root)
    return "+".join(roots) if len(roots) <= 3 else f"{roots[0]}..{roots[-1]}"


def backbone_stages(backbone: nn.Module) -> list[Stage]:
    """Stages of a timm model (its classifier removed), from the input to the output."""
    matcher = getattr(backbone, "group_matcher", None)
    names = [n for n, _ in backbone.named_parameters()]
    if matcher is None:
        # Not a timm model that describes itself: one stage holding everything.
        return [Stage(0, "all", tuple(names))]
    from timm.models import group_parameters  # timm takes seconds to import; the strategies' registry does not need it

    groups = group_parameters(backbone, matcher(coarse=True))
    stages = []
    for i, (_, members) in enumerate(sorted(groups.items())):
        stages.append(Stage(i, "stem" if i == 0 else _label(list(members)), tuple(members)))
    covered = {n for s in stages for n in s.param_names}
    missing = [n for n in names if n not in covered]
    if missing:  # parameters the matcher left out belong to the top, next to the head
        last = stages[-1]
        stages[-1] = Stage(last.index, last.label, last.param_names + tuple(missing))
    return stages
