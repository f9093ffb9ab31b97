"""Does LogME rank backbones the way fine-tuning them does? Measured side by side in one run.

For each dataset, ``python -m finetune.advise`` scores every candidate of ``advise.candidates``
(LogME on the advice's seeded sample, finetune/ranking.py) and names the recipe ``+recipe=auto``
would train; then each candidate is fine-tuned with that recipe (same data, seed and image size)
and its test top-1 read from ``metrics.json``. Printed per dataset: LogME, images/s, accuracy,
train seconds, and the Spearman rank correlation between LogME and accuracy (with three
candidates, rho is one of -1, -0.5, 0.5, 1: a coarse signal, stated as such).

    python benchmarks/logme_vs_finetune.py [--out DIR] [--datasets digits photos fashion100]
        [--epochs N]   # N: every run trains N epochs instead of the recipe's (a quicker, weaker check)

Results go to ``benchmarks/results/logme_vs_finetune.json`` (and the runs to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

DATASETS = {
    "digits": ["data=digits"],
    "photos": ["data=photos"],
    # 1,200 val images, not 6,000: validating every epoch would cost more than training on 1,000 images
    "fashion100": ["data=fashion_mnist", "data.train_per_class=100", "data.val_fraction=0.02"],
}
RESULTS = Path(__file__).parent / "results" / "logme_vs_finetune.json"


def _advice(data: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "finetune.advise", *data, "seed=42"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _finetune(data: list[str], recipe: str, name: str, run_dir: Path, epochs: int | None) -> dict:
    args = [sys.executable, "-m", "finetune", f"+recipe={recipe}", *data, f"backbone.name={name}",
            "backbone.weights=null", "seed=42", f"hydra.run.dir={run_dir}", "overwrite=true"]
    if epochs:
        args.append(f"trainer.max_epochs={epochs}")
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/logme_vs_finetune"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for ds in args.datasets:
        advice = _advice(DATASETS[ds])
        rows = []
        for cand in advice["backbones"]["candidates"]:
            m = _finetune(DATASETS[ds], advice["recipe"], cand["name"], args.out / ds / cand["name"], args.epochs)
            acc = m.get("test_acc", m.get("val_acc"))
            rows.append({**cand, "acc": acc, "acc_split": "test" if "test_acc" in m else "val",
                         "epochs": m["epochs"], "train_time_s": m["train_time_s"], "wall_s": round(m["wall_s"], 1)})
        rho = spearmanr([r["logme"] for r in rows], [r["acc"] for r in rows]).statistic
        best_acc = max(rows, key=lambda r: r["acc"])["name"]
        results[ds] = {"recipe": advice["recipe"], "chosen": advice["backbones"]["chosen"], "best_by_accuracy": best_acc,
                       "spearman": None if rho != rho else round(float(rho), 3), "epochs_override": args.epochs,
                       "rows": rows}
        print(f"\n{ds}: recipe {advice['recipe']}, LogME chose {advice['backbones']['chosen']}, "
              f"fine-tuning's best {best_acc}, Spearman {results[ds]['spearman']}")
        print("| backbone | LogME | images/s | acc | epochs | train s |")
        print("|---|--:|--:|--:|--:|--:|")
        for r in rows:
            print(f"| {r['name']} | {r['logme']:.4f} | {r['images_per_s']:.0f} | {100 * r['acc']:.2f}% "
                  f"({r['acc_split']}) | {r['epochs']} | {r['train_time_s']:.0f} |")
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
