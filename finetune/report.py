"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["print_summary"]


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"


def print_summary(
    metrics: dict[str, Any],
    run_dir: Path,
    class_counts: dict[str, list[int]],
    notes: list[str],
    classes: list[str] | None = None,
) -> None:
    m = metrics
    recipe = m.get("recipe") or "-"
    if m.get("advised_recipe"):  # +recipe=auto: which recipe it picked, and why
        recipe = f"{recipe} -> {m['advised_recipe']}: {m.get('advice', '')}"
    lines = [
        f"recipe      {recipe}",
        f"backbone    {m['backbone']}  (weights: {m['weights_source']})",
        f"data        {m['data']}  {m['num_classes']} classes, {m['image_size']} px, "
        + ", ".join(f"{k} {v}" for k, v in m["split_sizes"].items()),
        f"freeze      {m['freeze']}  trainable {m['trainable_params']:,} of {m['total_params']:,} params "
        f"({100 * m['trainable_params'] / max(1, m['total_params']):.1f}%)",
        f"training    {m['epochs']} epochs in {m['train_time_s']:.1f} s, precision {m.get('precision', '-')}"
        + (", cached features" if m.get("cached_features") else ""),
        f"val         top-1 {_pct(m.get('val_acc'))}   top-5 {_pct(m.get('val_top5'))}",
    ]
    if m.get("size"):  # the course's measures (finetune.layer_size): what trains, of the whole
        z = m["size"]
        lines.append(f"size        units {z['units']:,} ({z['units_kept_for_backward']:,} kept for backward), weights "
                     f"{z['weights']:,} ({z['trainable_weights']:,} trainable), connections {z['connections']:,}; "
                     f"{z['train_multiply_adds_per_image']:,} add-multiplies per training image"
                     + (f" (+ {z['feature_extraction_multiply_adds_per_image']:,} once: cached features)"
                        if "feature_extraction_multiply_adds_per_image" in z else ""))
    if "test_acc" in m:
        lines.append(f"test        top-1 {_pct(m.get('test_acc'))}   top-5 {_pct(m.get('test_top5'))}")
    for split, counts in class_counts.items():
        named = [f"{classes[i]}={c}" if classes and classes[i] != str(i) else str(c) for i, c in enumerate(counts)]
        shown = " ".join(named[:20]) + (" ..." if len(counts) > 20 else "")
        lines.append(f"per class   {split}: {shown}")
    lines += [f"note        {n}" for n in notes]
    lines.append(f"run dir     {run_dir}")
    width = max(len(s) for s in lines)
    bar = "=" * width
    print("\n".join(["", bar, "finetune summary".center(width), bar, *lines, bar]), flush=True)
