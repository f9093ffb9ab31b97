"""Re-planning at epoch boundaries (``budget_replan``) against the plan made once, when the host's speed changes.

Two runs start together, one per core where ``taskset`` exists (one thread each), with the same data, seed
and budget: ``budget_replan=false`` and ``budget_replan=true``. Each shares its core with a CPU-bound burner
process, started and stopped by what its own log says:

- ``faster``: the burner runs from the start until the run prints its plan, so the steps were timed at about
  half speed and then run at full speed (the 60-minute Fashion-MNIST run that timed 0.414 s steps, averaged
  0.382 s and ended at 0.85x, in a stronger form);
- ``slower``: the burner starts when the run prints its plan, so every epoch runs at about half the planned
  speed (the case the safety net cut before).

Printed per run: epochs planned, re-planned and trained, whether the safety net stopped training, the share
of the budget used and test top-1. Results go to ``benchmarks/results/replan.json``.

    python benchmarks/replan.py [--budget 3m] [--scenarios faster slower] [-- OVERRIDES...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "replan.json"
ARMS = {"plan_once": ["budget_replan=false"], "replan": ["budget_replan=true"]}
PLAN_LINE = "batches ("  # "budget 3m: 12 epochs of 80 batches (960 steps at 0.123s), ..."


def _pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


def _burner(core: int) -> subprocess.Popen:
    return subprocess.Popen([*_pinned(core), sys.executable, "-c", "while True: pass"])


def _planned(log: Path) -> bool:
    return log.exists() and PLAN_LINE in log.read_text(errors="replace")


def scenario(name: str, budget: str, overrides: list[str], out: Path) -> dict:
    """Both arms at once, one per core, each with its own burner as the scenario says."""
    where = out / name
    where.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, burners, logs = {}, {}, {}
    for core, (arm, extra) in enumerate(ARMS.items()):
        logs[arm] = where / f"{arm}.log"
        logs[arm].unlink(missing_ok=True)
        if name == "faster":
            burners[arm] = _burner(core)
        with logs[arm].open("w") as f:
            procs[arm] = subprocess.Popen(
                [*_pinned(core), sys.executable, "-m", "finetune", f"budget={budget}", *overrides, *extra,
                 f"hydra.run.dir={where / arm}", "overwrite=true", "trainer.enable_progress_bar=false"],
                stdout=f, stderr=subprocess.STDOUT, env=env)
    pending = set(ARMS)
    while any(p.poll() is None for p in procs.values()):
        for arm in list(pending):
            if _planned(logs[arm]):
                pending.discard(arm)
                if name == "faster":
                    burners.pop(arm).kill()
                else:
                    burners[arm] = _burner(list(ARMS).index(arm))
        time.sleep(0.5)
    for b in burners.values():
        b.kill()
    rows = {}
    for arm, p in procs.items():
        if p.returncode != 0:
            raise SystemExit(f"error: the {arm} run of {name} failed; see {logs[arm]}")
        m = json.loads((where / arm / "metrics.json").read_text())
        b = m["budget"]
        rows[arm] = {"epochs_planned": b["epochs"], "replanned": b.get("replanned", []),
                     "epochs_trained": b["epochs_trained"], "stopped_by_timer": b["stopped_by_timer"],
                     "slowdown": b.get("slowdown"), "took_s": b["took_s"], "budget_s": b["budget_s"],
                     "budget_used": round(b["took_s"] / b["budget_s"], 3), "test_acc": m.get("test_acc")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--scenarios", nargs="+", default=["faster", "slower"], choices=["faster", "slower"])
    parser.add_argument("--out", type=Path, default=Path("outputs/replan"))
    parser.add_argument("overrides", nargs="*", default=[
        "+recipe=auto", "data=fashion_mnist", "data.train_per_class=300", "data.val_fraction=0.02", "seed=42"])
    args = parser.parse_args()
    results = {"budget": args.budget, "overrides": args.overrides, "scenarios": {}}
    print(f"{'scenario':>8} {'arm':>9} {'planned':>7} {'trained':>7} {'net cut':>7} {'used':>6} {'test':>6}  re-plans")
    for name in args.scenarios:
        rows = scenario(name, args.budget, args.overrides, args.out)
        results["scenarios"][name] = rows
        for arm, r in rows.items():
            moves = " ".join(f"e{c['epoch']}:{c['epochs']}@{c['pace']}" for c in r["replanned"][:6])
            print(f"{name:>8} {arm:>9} {r['epochs_planned']:>7} {r['epochs_trained']:>7} "
                  f"{str(r['stopped_by_timer']):>7} {r['budget_used']:>5.2f}x {100 * (r['test_acc'] or 0):>6.2f}  {moves}")
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
