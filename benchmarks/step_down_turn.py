"""Where full fine-tuning overtakes ``top_stages`` as a budget grows: the evidence for ``advise.min_schedule_multiple``.

For each data set and budget, two ``+recipe=auto`` runs start together, side by side (one per core where
``taskset`` exists, one thread each), with the same data, seed and budget:

- ``none``: ``advise.min_schedule_multiple=0`` (any budget is enough: the recipe's full fine-tuning trains);
- ``top_stages``: ``advise.min_schedule_multiple=null advise.linear_probe_below_steps=null`` (steps alone:
  under ``advise.min_full_steps`` steps it always steps down).

Both plan their epochs to fill the budget. Printed per pair: the multiple of the recipe's epochs the
budget affords full fine-tuning (the advice's estimate, as the rule sees it), each run's test top-1,
epochs and budget use, their difference, and what the default rule (``advise.min_schedule_multiple``,
read from the config) chooses there. Results go to ``benchmarks/results/step_down_turn.json``.

    python benchmarks/step_down_turn.py [--data fashion_mnist digits] [--budgets 1m 1m30s 2m10s] [--per-class 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from finetune.config import compose

RESULTS = Path(__file__).parent / "results" / "step_down_turn.json"
ARMS = {
    "none": ["advise.min_schedule_multiple=0"],
    "top_stages": ["advise.min_schedule_multiple=null", "advise.linear_probe_below_steps=null"],
}


def _start(core: int, args: list[str], log: Path) -> subprocess.Popen:
    pin = ["taskset", "-c", str(core)] if shutil.which("taskset") else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        return subprocess.Popen([*pin, sys.executable, "-m", "finetune", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env)


def _read(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    plan = json.loads((run_dir / "advice.json").read_text()).get("budget_strategy") or {}
    budget = m.get("budget") or {}
    return {"freeze": m["freeze"], "test_acc": m["test_acc"], "epochs": m["epochs"],
            "took_s": budget.get("took_s"), "budget_s": budget.get("budget_s"),
            "epochs_affordable": plan.get("epochs_affordable"), "recipe_epochs": plan.get("recipe_epochs"),
            "steps_affordable": plan.get("steps_affordable")}


def pair(dataset: str, budget: str, per_class: int, out: Path) -> dict:
    """One data set and budget: both arms at once, one per core."""
    split = ["data.val_fraction=0.02"] if dataset == "fashion_mnist" else []
    common = ["+recipe=auto", f"data={dataset}", f"data.train_per_class={per_class}", *split, "seed=42",
              f"budget={budget}", "overwrite=true"]
    where = out / dataset / budget
    where.mkdir(parents=True, exist_ok=True)
    procs = {arm: _start(core, [*common, *extra, f"hydra.run.dir={where / arm}"], where / f"{arm}.log")
             for core, (arm, extra) in enumerate(ARMS.items())}
    for arm, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"error: the {arm} run failed; see {where / f'{arm}.log'}")
    runs = {arm: _read(where / arm) for arm in ARMS}
    est = runs["none"]
    multiple = est["epochs_affordable"] / est["recipe_epochs"]
    default = compose([]).advise.min_schedule_multiple
    choice = "none" if default is not None and multiple >= default else "top_stages"
    diff = 100 * (runs["none"]["test_acc"] - runs["top_stages"]["test_acc"])
    return {"data": dataset, "budget": budget, "images_per_class": per_class, "multiple_afforded": round(multiple, 2),
            "runs": runs, "none_minus_top_stages_points": round(diff, 2), "default_multiple": default,
            "default_chooses": choice, "default_chose_better": (choice == "none") == (diff > 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["fashion_mnist", "digits"])
    ap.add_argument("--budgets", nargs="+", default=["1m", "1m30s", "2m10s"])
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("outputs/step_down_turn"))
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for dataset in args.data:
        for budget in args.budgets:
            r = pair(dataset, budget, args.per_class, args.out)
            results[f"{dataset}-{args.per_class}-{budget}"] = r
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            n, t = r["runs"]["none"], r["runs"]["top_stages"]
            print(f"{dataset} {args.per_class}/class, budget {budget}: affords {r['multiple_afforded']:.2f}x the "
                  f"recipe's epochs; none {100 * n['test_acc']:.2f}% ({n['epochs']} ep, {n['took_s']:.0f} s), "
                  f"{t['freeze']} {100 * t['test_acc']:.2f}% ({t['epochs']} ep, {t['took_s']:.0f} s): "
                  f"{r['none_minus_top_stages_points']:+.2f} points; the default "
                  f"(x{r['default_multiple']}) trains {r['default_chooses']}"
                  + ("" if r["default_chose_better"] else " (the worse here)"), flush=True)


if __name__ == "__main__":
    main()
