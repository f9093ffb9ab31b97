"""How a ``+recipe=tune budget=T`` sweep spends its budget: each trial's share, what was handed on, what it took.

Runs one sweep (Hydra's Optuna sweeper, trials one at a time, Optuna's MedianPruner) and prints a row per
trial from its ``metrics.json``: the freeze strategy drawn, the plain share ``T / n_trials``, the seconds
handed on from earlier trials (finetune/trial_budget.py), the budget it planned to, what it took by its own
clock, the epochs it trained and where it was pruned; then the sum of the trials' clocks against ``T``
and the sweep's wall time (process start-ups and the sweeper's own work included).

    python benchmarks/tune_budget.py [--budget 8m] [--trials 8] [--out DIR] [-- OVERRIDES...]

Results go to ``benchmarks/results/tune_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from finetune.budget import parse_budget

RESULTS = Path(__file__).parent / "results" / "tune_budget.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="8m")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("outputs/tune_budget"))
    parser.add_argument("overrides", nargs="*", default=["data=digits", "data.image_size=32", "seed=42"])
    args = parser.parse_args()
    sweep = args.out / "sweep"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", "+recipe=tune", f"budget={args.budget}",
                    f"tune.n_trials={args.trials}", *args.overrides, f"hydra.sweep.dir={sweep}",
                    "trainer.enable_progress_bar=false"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = []
    for d in sorted((p for p in sweep.iterdir() if (p / "metrics.json").exists()), key=lambda p: int(p.name)):
        m = json.loads((d / "metrics.json").read_text())
        b = m.get("budget") or {}
        trial = b.get("trial") or {}
        rows.append({"trial": int(d.name), "status": m.get("status"), "freeze": m.get("freeze"),
                     "share_s": trial.get("share_s"), "handed_on_s": trial.get("handed_on_s", 0.0),
                     "budget_s": b.get("budget_s"), "took_s": b.get("took_s"), "epochs": b.get("epochs_trained"),
                     "pruned_at_epoch": (m.get("pruned") or {}).get("epoch"), "val_acc": m.get("val_acc")})
    print(f"{'trial':>5} {'freeze':>10} {'share':>7} {'handed on':>9} {'budget':>7} {'took':>7} {'epochs':>6} "
          f"{'pruned':>6} {'val':>6}")
    for r in rows:
        print(f"{r['trial']:>5} {str(r['freeze']):>10} {r['share_s'] or 0:>7.1f} {r['handed_on_s']:>9.1f} "
              f"{r['budget_s'] or 0:>7.1f} {r['took_s'] or 0:>7.1f} {r['epochs'] or 0:>6} "
              f"{'' if r['pruned_at_epoch'] is None else r['pruned_at_epoch']:>6} {100 * (r['val_acc'] or 0):>6.2f}")
    budget_s = parse_budget(args.budget)
    took = sum(r["took_s"] or 0 for r in rows)
    best = max(rows, key=lambda r: r["val_acc"] or 0) if rows else None
    summary = {"budget": args.budget, "budget_s": budget_s, "trials": args.trials, "overrides": args.overrides,
               "trials_clock_s": round(took, 1), "clock_share_of_budget": round(took / budget_s, 3),
               "sweep_wall_s": round(wall, 1), "epochs_trained": sum(r["epochs"] or 0 for r in rows),
               "pruned": sum(r["pruned_at_epoch"] is not None for r in rows),
               "best_trial": best["trial"] if best else None, "best_val_acc": best["val_acc"] if best else None,
               "rows": rows}
    print(f"trials' clocks {took:.0f} s of {budget_s:.0f} s ({summary['clock_share_of_budget']}x); sweep wall "
          f"{wall:.0f} s; {summary['epochs_trained']} epochs, {summary['pruned']} pruned; best trial "
          f"{summary['best_trial']} val {100 * (summary['best_val_acc'] or 0):.2f}%")
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
