"""A greedy soup of a sweep's runs (Wortsman et al. 2022, "Model soups", greedy recipe): ``compare DIR --soup``.

Runs that share a start (backbone, pretrained weights, data and its split, classes: the same
``config.yaml`` sections and seed) are sorted by their ``checkpoints/last.ckpt``'s val accuracy; from the
best one, each next run's weights join the uniform average when the average's val accuracy does not
drop. Everything is measured here on the same val split, through ``finetune.evaluate``'s inference path.
Runs that cannot join are counted with their reason: unfinished, no ``last.ckpt``, another start than
the largest group's, or other parameters (``freeze=lora`` adds adapters, ``head=mlp`` another head:
they cannot be averaged key by key). Writes ``soup.ckpt`` (loads with ``FineTuneModule.load_from_checkpoint``,
its temperature fitted on val) into ``DIR/soup/checkpoints/``, with ``soup.json`` and the best run's
``config.yaml`` in ``DIR/soup/``: a run directory, so ``finetune.evaluate ckpt=DIR/soup/checkpoints/soup.ckpt``
scores it on the runs' data.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf

from finetune.builders import build_datamodule
from finetune.calibration import fit_temperature
from finetune.checkpoint_io import atomic_save, safe_load
from finetune.checkpoints import class_names, load_checkpoint, resolve_preprocessing
from finetune.comparison.runs import Run
from finetune.errors import FineTuneError
from finetune.evaluate import check_classes, compose_for, split_probabilities
from finetune.weight_space import State, mean_state, mismatch, scores, weights_checkpoint

__all__ = ["Soup", "greedy_soup", "soup_row"]

# What makes two runs' starting points the same: these config sections, compared whole.
_START_KEYS = ("backbone.name", "backbone.pretrained", "backbone.weights", "data", "seed")


@dataclass
class Soup:
    """The result of :func:`greedy_soup`: the names kept, their average, its val accuracy, each step."""

    kept: list[str]
    state: dict[str, torch.Tensor]
    val_acc: float
    steps: list[dict[str, Any]] = field(default_factory=list)


def greedy_soup(states: dict[str, State], val_acc: Callable[[State], float]) -> Soup:
    """Wortsman et al.'s greedy soup of ``states`` (name -> weights), ``val_acc`` scoring any weights.

    Ingredients are tried best first (ties in name order); each joins when the soup's val accuracy does not drop.
    """
    if not states:
        raise FineTuneError("no runs to make a soup of")
    alone = {name: val_acc(s) for name, s in states.items()}
    order = sorted(states, key=lambda n: -alone[n])
    kept, best = [order[0]], alone[order[0]]
    steps = [{"run": order[0], "val_acc": alone[order[0]], "soup_val_acc": best, "kept": True}]
    for name in order[1:]:
        acc = val_acc(mean_state([states[n] for n in (*kept, name)]))
        steps.append({"run": name, "val_acc": alone[name], "soup_val_acc": acc, "kept": acc >= best})
        if acc >= best:
            kept.append(name)
            best = acc
    return Soup(kept, mean_state([states[n] for n in kept]), best, steps)


def _start_of(run: Run) -> str | None:
    path = run.path / "config.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    return json.dumps({k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
                       for k in _START_KEYS for v in [OmegaConf.select(cfg, k)]}, sort_keys=True, default=str)


def _candidates(runs: Sequence[Run]) -> tuple[list[Run], list[dict[str, str]]]:
    """The runs of the largest group sharing a start (best val accuracy breaks ties), and why the others are out."""
    skipped: list[dict[str, str]] = []
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.status != "ok":
            skipped.append({"run": r.name, "reason": f"status {r.status}"})
        elif not (r.path / "checkpoints" / "last.ckpt").is_file():
            skipped.append({"run": r.name, "reason": "no checkpoints/last.ckpt"})
        elif (start := _start_of(r)) is None:
            skipped.append({"run": r.name, "reason": "no config.yaml to tell its start"})
        else:
            groups.setdefault(start, []).append(r)
    if not groups:
        raise FineTuneError(f"no run can go into a soup ({len(skipped)} skipped: "
                            + "; ".join(f"{s['run']}: {s['reason']}" for s in skipped[:3]) + ")")
    chosen = max(groups.values(), key=lambda g: (len(g), max(float(r.metrics.get("val_acc") or 0) for r in g)))
    for group in groups.values():
        if group is not chosen:
            skipped += [{"run": r.name, "reason": "another start (backbone, weights, data or seed) than the soup's"}
                        for r in group]
    return chosen, skipped


def soup_row(root: str | Path, runs: Sequence[Run], columns: Sequence[str], batch_size: int = 64
             ) -> tuple[dict[str, Any], list[str]]:
    """Make the soup of ``runs``; write ``soup/checkpoints/soup.ckpt``, ``soup/soup.json`` and ``soup/config.yaml``.

    Returns:
        The comparison row (``columns``; run ``soup (0+2)``) and the report's note lines.
    """
    root = Path(root).expanduser()
    group, skipped = _candidates(runs)
    group.sort(key=lambda r: -float(r.metrics.get("val_acc") or 0))
    ref_path = str(group[0].path / "checkpoints" / "last.ckpt")
    module, ref = load_checkpoint(ref_path)
    raws: dict[str, dict[str, Any]] = {}
    for r in group:
        raw = ref if r is group[0] else safe_load(r.path / "checkpoints" / "last.ckpt")
        why = mismatch((ref.get("hyper_parameters") or {}, ref["state_dict"]),
                       (raw.get("hyper_parameters") or {}, raw["state_dict"]))
        if why:
            skipped.append({"run": r.name, "reason": f"cannot be averaged with run {group[0].name}: {why}"})
        else:
            raws[r.name] = raw
    dm = build_datamodule(compose_for(ref_path, [], module))
    check_classes(dm.classes, class_names(module))
    if not len(dm.data.splits.get("val", ())):
        raise FineTuneError("a greedy soup chooses on val images, and the runs' data has none")
    prep = resolve_preprocessing(module, ref, ref_path)

    def measure(state: State, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        module.load_state_dict(state)
        return split_probabilities(module, dm.data.splits[split], prep, batch_size, dm.num_workers, temperature=1.0)

    soup = greedy_soup({n: raw["state_dict"] for n, raw in raws.items()},
                       lambda s: float(scores(*measure(s, "val"))["acc"] or 0.0))
    val_probs, val_labels = measure(soup.state, "val")
    result: dict[str, Any] = {"kept": soup.kept, "val": scores(val_probs, val_labels), "steps": soup.steps,
                              "skipped": skipped}
    if dm.has_test:
        result["test"] = scores(*measure(soup.state, "test"))
    temperature = fit_temperature(val_probs.double().clamp_min(torch.finfo(torch.float32).tiny).log(), val_labels)
    info = {"method": "greedy_soup", "runs": soup.kept, "root": str(root.resolve())}
    # Laid out as a run directory (its config.yaml the best run's), so evaluate and predict find its data.
    out = root / "soup"
    atomic_save(weights_checkpoint(ref, soup.state, temperature, info), out / "checkpoints" / "soup.ckpt")
    shutil.copyfile(group[0].path / "config.yaml", out / "config.yaml")
    result.update({"temperature": round(temperature, 6), "checkpoint": str(out / "checkpoints" / "soup.ckpt")})
    (out / "soup.json").write_text(json.dumps(result, indent=2) + "\n")

    row: dict[str, Any] = {c: "" for c in columns}
    row.update({"run": f"soup ({'+'.join(soup.kept)})", "status": "ok", "val_acc": result["val"]["acc"],
                "test_acc": (result.get("test") or {}).get("acc", "")})
    notes = [f"Greedy soup (Wortsman et al. 2022): {len(soup.kept)} of {len(raws)} averaged runs kept "
             f"({', '.join(soup.kept)}), tried best val first: soup/checkpoints/soup.ckpt, soup/soup.json."]
    if skipped:
        notes.append(f"{len(skipped)} run(s) not in the soup: "
                     + "; ".join(f"{s['run']} ({s['reason']})" for s in skipped) + ".")
    return row, notes
