"""``python -m finetune.interpolate A.ckpt B.ckpt [alphas=...] [out=DIR]``: WiSE-FT between two checkpoints.

Every weight is interpolated, ``(1 - alpha) * A + alpha * B`` (:mod:`finetune.weight_space`), for each
alpha of the grid; each point is scored on the val split (and test where the data has one) of B's run,
rebuilt from its saved config as ``finetune.evaluate`` does, through the same inference path, so alpha 0
and 1 give exactly what ``finetune.evaluate`` says of A and B. Alpha is chosen on val (best accuracy,
then lowest loss). Wortsman et al. 2022 (WiSE-FT) interpolate the zero-shot start and the fine-tuned
weights; here A is any start (``checkpoints/wise_ft_start.ckpt`` of a ``wise_ft=true`` run is one).

Writes ``interpolation.json`` (the curve) and ``interpolation.png`` into B's run directory (``out=DIR``
to choose), and the chosen weights as ``wise_ft.ckpt`` beside B (in ``DIR`` with ``out=``), with a
temperature refitted on val for those weights (one scalar: cheap), so it predicts calibrated.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from finetune.calibration import fit_temperature
from finetune.checkpoint_io import atomic_save
from finetune.checkpoints import class_names, load_checkpoint, output_dir_of, resolve_preprocessing, run_dir_of
from finetune.errors import FineTuneError
from finetune.evaluate import check_classes, compose_for, split_probabilities
from finetune.weight_space import (
    DEFAULT_ALPHAS, check_alphas, lerp_state, mismatch, plot_curve, sweep_alphas, weights_checkpoint,
)

__all__ = ["format_curve", "interpolate", "main", "require_same_model"]

HELP = """\
python -m finetune.interpolate: WiSE-FT between two checkpoints of one architecture and one set of classes.

usage: python -m finetune.interpolate A.ckpt B.ckpt [alphas=0,0.1,...,1] [out=DIR] [batch_size=64]

Each weight becomes (1 - alpha) * A + alpha * B for every alpha; each is scored on the val split of B's
run (and its test split where there is one); alpha is chosen on val. Writes interpolation.json and
interpolation.png into B's run directory, and the chosen weights as wise_ft.ckpt beside B (out=DIR: all
three in DIR).

example:
  python -m finetune.interpolate RUN/checkpoints/wise_ft_start.ckpt RUN/checkpoints/last.ckpt alphas=0,0.5,1
"""


def require_same_model(a: tuple[str, dict[str, Any]], b: tuple[str, dict[str, Any]]) -> None:
    """Raise one line naming the difference unless two raw checkpoints ``(path, dict)`` can be interpolated."""
    why = mismatch((a[1].get("hyper_parameters") or {}, a[1]["state_dict"]),
                   (b[1].get("hyper_parameters") or {}, b[1]["state_dict"]))
    if why:
        raise FineTuneError(f"cannot average '{a[0]}' and '{b[0]}': {why}")


def interpolate(a: str, b: str, alphas: Sequence[float] = DEFAULT_ALPHAS, out: str | None = None,
                batch_size: int = 64) -> dict[str, Any]:
    """The command; returns what ``interpolation.json`` holds."""
    from finetune.builders import build_datamodule  # Lightning: seconds to import, not for --help

    grid = check_alphas(alphas)
    if batch_size < 1:
        raise FineTuneError(f"batch_size must be a positive integer, got {batch_size}")
    started = time.perf_counter()
    _, raw_a = load_checkpoint(a)
    module, raw_b = load_checkpoint(b)
    require_same_model((a, raw_a), (b, raw_b))
    dm = build_datamodule(compose_for(b, [], module))
    check_classes(dm.classes, class_names(module))
    if not len(dm.data.splits.get("val", ())):
        raise FineTuneError("choosing alpha needs val images, and the data of this run has none")
    prep = resolve_preprocessing(module, raw_b, b)
    splits = ["val", *(["test"] if dm.has_test else [])]

    def measure() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {s: split_probabilities(module, dm.data.splits[s], prep, batch_size, dm.num_workers, temperature=1.0)
                for s in splits}

    start, end = raw_a["state_dict"], raw_b["state_dict"]
    curve, chosen, at = sweep_alphas(module, start, end, grid, measure)
    val_probs, val_labels = at["val"]
    # log-probabilities are the logits up to a per-image shift, which softmax ignores: the same T.
    temperature = fit_temperature(val_probs.double().clamp_min(torch.finfo(torch.float32).tiny).log(), val_labels)

    out_dir = Path(out).expanduser() if out else output_dir_of(b)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir if out else (run_dir_of(b) / "checkpoints" if run_dir_of(b) else Path(b).expanduser().parent)
    ckpt = ckpt_dir / "wise_ft.ckpt"
    info = {"method": "wise_ft", "alpha": chosen["alpha"], "start": str(Path(a).expanduser().resolve()),
            "end": str(Path(b).expanduser().resolve())}
    atomic_save(weights_checkpoint(raw_b, lerp_state(start, end, chosen["alpha"]), temperature, info), ckpt)
    result = {**info, "data": dm.data.name, "splits": splits, "alphas": grid, "chosen_alpha": chosen["alpha"],
              "chosen": dict(chosen), "curve": curve, "temperature": round(temperature, 6), "checkpoint": str(ckpt),
              "time_s": round(time.perf_counter() - started, 2)}
    (out_dir / "interpolation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curve(curve, chosen["alpha"], out_dir / "interpolation.png", f"{dm.data.name}: WiSE-FT, A (0) to B (1)")
    print(format_curve(curve, chosen["alpha"]))
    print(f"chosen alpha {chosen['alpha']:g} (on val); temperature {temperature:.3g} refitted for its weights")
    print(f"wrote {out_dir / 'interpolation.json'}, {out_dir / 'interpolation.png'} and {ckpt}")
    return result


def format_curve(curve: Sequence[dict[str, Any]], chosen: float) -> str:
    """The curve as a table, the chosen alpha marked."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    lines = ["alpha   val top-1   val loss   test top-1"]
    for p in curve:
        mark = "  <- chosen" if p["alpha"] == chosen else ""
        lines.append(f"{p['alpha']:<7g} {pct(p['val_acc']):>9}   {p['val_loss']:8.4f}   "
                     f"{pct(p.get('test_acc')):>10}{mark}")
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> dict[str, Any]:
    paths = [x for x in argv if "=" not in x]
    options = dict(x.split("=", 1) for x in argv if "=" in x)
    if len(paths) != 2:
        raise FineTuneError(f"give two checkpoints, A.ckpt B.ckpt; got {len(paths)} ({' '.join(paths) or 'none'})")
    unknown = sorted(set(options) - {"alphas", "out", "batch_size"})
    if unknown:
        raise FineTuneError(f"unknown option(s) {', '.join(unknown)}; this command takes alphas=, out=, batch_size=")
    kwargs: dict[str, Any] = {"a": paths[0], "b": paths[1], "out": options.get("out")}
    if "alphas" in options:
        kwargs["alphas"] = [v for v in options["alphas"].strip("[]").split(",") if v.strip()]
    if "batch_size" in options:
        try:
            kwargs["batch_size"] = int(options["batch_size"])
        except ValueError:
            raise FineTuneError(f"batch_size must be an integer, got '{options['batch_size']}'") from None
    return kwargs


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.interpolate A.ckpt B.ckpt [alphas=...] [out=DIR] [batch_size=N]``."""
    from finetune.help import asked_for_help

    args = list(sys.argv[1:] if argv is None else argv)
    if asked_for_help(args):
        print(HELP)
        return
    try:
        interpolate(**_parse(args))
    except FineTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
