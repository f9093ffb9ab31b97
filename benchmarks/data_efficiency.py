"""``+recipe=auto`` against every fixed strategy, at 10, 100 and 1,000 Fashion-MNIST images per class.

At each size: the ``+recipe=compare`` sweep (every compared freeze strategy, one run each) and one
``+recipe=auto`` run (advice, backbone ranking and training). Either each run has the same time budget
(``budget=``: each plans its own epochs, its LR schedule ends on time, advice and ranking count), or,
with ``none`` as the budget, every run trains its own recipe's length (the sweep 15 epochs, auto its
recipe's).
Printed per size: auto's test top-1 and wall time, the best fixed strategy's, ``head_only`` and ``none``,
and the sweep's total wall time; the same rows go to ``benchmarks/results/data_efficiency.json``, and
``docs/data_efficiency.png`` plots test top-1 against images per class for auto, head_only and none.
The official 10,000 test images and one seeded 1,200-image val split serve every size (``data.train_per_class``
subsets the rest), so all sizes are scored on the same images.

    python benchmarks/data_efficiency.py [--sizes 10 100 1000] [--budgets 1m 1m30s 3m] [--out DIR]
    python benchmarks/data_efficiency.py --sizes 10 100 --budgets none none   # recipe lengths
    python benchmarks/data_efficiency.py --reuse-sweeps   # auto again, against the sweeps already in --out
    python benchmarks/data_efficiency.py --plot   # only the picture, from the results file
    python benchmarks/data_efficiency.py --data digits --sizes 10 50 --budgets 1m 1m30s   # another data set
    python benchmarks/data_efficiency.py --seed 43 --sizes 10 --budgets 1m   # another seed: sweep and auto

With ``--data digits`` (scikit-learn's 8x8 digits, its own val and test splits) the rows are keyed
``digits-N`` and left out of the picture, which is Fashion-MNIST's. Seeds other than 42 (``--seed``: another
training subset, val split and initialization) are keyed ``N-seedS`` and left out of the picture too.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_efficiency.json"
PICTURE = Path(__file__).parent.parent / "docs" / "data_efficiency.png"


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(n: int, budget: str, out: Path, before: dict | None = None, dataset: str = "fashion_mnist",
            seed: int = 42) -> dict:
    """One size: the sweep (or, given ``before``, the result file's entry, its finished sweep reused) and auto."""
    # Fashion-MNIST: 1,200 val images (val_fraction 0.02), not 6,000: each epoch validates, budgets are minutes
    split = ["data.val_fraction=0.02"] if dataset == "fashion_mnist" else []
    data = [f"data={dataset}", f"data.train_per_class={n}", *split, f"seed={seed}",
            *([f"budget={budget}"] if budget != "none" else [])]
    where = (out if dataset == "fashion_mnist" else out / dataset) / (f"{n}" if budget != "none" else f"{n}-recipe")
    where = where if seed == 42 else where.with_name(f"{where.name}-seed{seed}")
    sweep_dir = where / "compare"
    reuse = before is not None and (sweep_dir / "comparison.csv").exists()
    sweep_s = before["sweep_wall_s"] if reuse else _run(["+recipe=compare", *data, f"hydra.sweep.dir={sweep_dir}"])
    with (sweep_dir / "comparison.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok"]
    fixed = {r["freeze"]: float(r["test_acc"]) for r in rows}
    auto_dir = where / "auto"
    auto_s = _run(["+recipe=auto", *data, f"hydra.run.dir={auto_dir}", "overwrite=true"])
    m = json.loads((auto_dir / "metrics.json").read_text())
    best = max(fixed, key=fixed.get)
    # What auto got before: the first recorded run (the picture's "earlier run"), and every run since
    kept = {"sweep_reused": True, "auto_before": before.get("auto_before", before["auto"]),
            "auto_earlier": [*before.get("auto_earlier", []), before["auto"]]} if reuse else {}
    return {**kept,
        "data": dataset, "images_per_class": n, "budget": budget, "seed": seed,
        "auto": {"test_acc": m["test_acc"], "wall_s": round(auto_s, 1), "recipe": m["advised_recipe"],
                 "backbone": m["backbone"], "freeze": m["freeze"], "epochs": m["epochs"],
                 "lr_find": (m.get("lr_find") or {}).get("lr"), "took_s": (m.get("budget") or {}).get("took_s")},
        "fixed": fixed, "best_fixed": best, "sweep_wall_s": round(sweep_s, 1), "sweep_runs": len(fixed),
        "auto_minus_best_points": round(100 * (m["test_acc"] - fixed[best]), 2),
        "auto_time_share_of_sweep": round(auto_s / sweep_s, 3),
    }


def plot(results: dict) -> None:
    """One panel per way of sizing the runs: the same budget per run, and recipe lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fashion = [r for r in results.values()
               if r.get("data", "fashion_mnist") == "fashion_mnist" and r.get("seed", 42) == 42]
    panels = [(title, sorted((r for r in fashion if pick(r)), key=lambda r: r["images_per_class"]))
              for title, pick in (("same time budget per run", lambda r: r["budget"] != "none"),
                                  ("recipe lengths (no budget)", lambda r: r["budget"] == "none"))]
    panels = [(t, rows) for t, rows in panels if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (title, rows) in zip(axes[0], panels):
        x = [r["images_per_class"] for r in rows]
        for label, ys in (("auto", [r["auto"]["test_acc"] for r in rows]),
                          ("head_only", [r["fixed"].get("head_only") for r in rows]),
                          ("none (full fine-tuning)", [r["fixed"].get("none") for r in rows]),
                          ("best fixed strategy", [r["fixed"][r["best_fixed"]] for r in rows])):
            ax.plot(x, [100 * y if y is not None else None for y in ys], marker="o", label=label,
                    linestyle=":" if label.startswith("best") else "-")
        if all("auto_before" in r for r in rows):  # --reuse-sweeps: what auto got before, beside what it gets now
            ax.plot(x, [100 * r["auto_before"]["test_acc"] for r in rows], marker="x", color="grey", linestyle="--",
                    label="auto, earlier run (" + "/".join(sorted({str(r["auto_before"]["freeze"]) for r in rows})) + ")")
        ax.set_xscale("log")
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("training images per class (Fashion-MNIST)")
        budgets = ", ".join(f"{r['images_per_class']}: {r['budget']}" for r in rows) if rows[0]["budget"] != "none" else ""
        ax.set_title(title + (f" ({budgets})" if budgets else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PICTURE, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion_mnist", help="fashion_mnist or digits (the data= option)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--budgets", nargs="+", default=["1m", "1m30s", "3m"])
    parser.add_argument("--out", type=Path, default=Path("outputs/data_efficiency"))
    parser.add_argument("--seed", type=int, default=42, help="seed= of every run (the picture shows 42's)")
    parser.add_argument("--plot", action="store_true", help="only draw the picture from the results file")
    parser.add_argument("--reuse-sweeps", action="store_true",
                        help="rerun only auto where --out holds a finished sweep (its time read from the results file)")
    args = parser.parse_args()
    if len(args.budgets) != len(args.sizes):
        parser.error("one budget per size")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.plot:
        for n, budget in zip(args.sizes, args.budgets):
            key = (str(n) if budget != "none" else f"{n}-recipe")
            key = key if args.data == "fashion_mnist" else f"{args.data}-{key}"
            key = key if args.seed == 42 else f"{key}-seed{args.seed}"
            before = results.get(key) if args.reuse_sweeps and results.get(key, {}).get("budget") == budget else None
            r = measure(n, budget, args.out, before, args.data, args.seed)
            results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # another size may have landed
            results[key] = r
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{args.data} {n}/class, seed {args.seed}, budget {budget}: auto {100 * r['auto']['test_acc']:.2f}% in {r['auto']['wall_s']:.0f}s "
                  f"({r['auto']['recipe']}, {r['auto']['backbone']}); best fixed {r['best_fixed']} "
                  f"{100 * r['fixed'][r['best_fixed']]:.2f}% ({r['auto_minus_best_points']:+.2f} points); "
                  f"sweep of {r['sweep_runs']} runs {r['sweep_wall_s']:.0f}s (auto {r['auto_time_share_of_sweep']:.2f}x)",
                  flush=True)
    plot(results)


if __name__ == "__main__":
    main()
