"""Does the backbone ranking's speed measurement keep Lite0 < Lite1 < Lite2 in cost on a busy host?

Each round is a fresh process (as a run is) that runs the advice on Fashion-MNIST (100 per class) with the three
offline candidates and records two speeds of every candidate's pass over the same 256 images: the whole pass
timed once (data loading included; what ranking used before) and :class:`finetune.forward_clock.ForwardClock`'s
(forward calls only, first left out, fastest batch per image; what it uses now). With ``--busy``, another process
on the same core runs in bursts at random (busy 0.05-0.3 s, idle 0.05-0.3 s), as other jobs do on a shared host.
Printed: per method, in how many rounds the measured order was Lite0 > Lite1 > Lite2 in images/s and in how many
Lite0 was the fastest, and each candidate's spread (coefficient of variation) across rounds; the rows go to
``benchmarks/results/forward_clock.json``.

    taskset -c 1 python benchmarks/forward_clock.py [--rounds 8] [--busy]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "forward_clock.json"
NAMES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def _round() -> None:
    """One fresh process: the advice, with each pass's whole wall time recorded beside ForwardClock's rate."""
    import finetune.ranking as ranking
    import finetune.similarity as similarity
    from finetune.advise import advise
    from finetune.config import compose

    whole: list[tuple[int, float]] = []
    inner = similarity.measure_similarity

    def timed(model, batches, outputs=None):
        start = time.perf_counter()
        sim = inner(model, batches, outputs)
        whole.append((sim.images, time.perf_counter() - start))
        return sim

    similarity.measure_similarity = ranking.measure_similarity = timed
    cfg = compose(["data=fashion_mnist", "data.train_per_class=100", f"advise.candidates=[{','.join(NAMES)}]"])
    ranked = advise(cfg)["backbones"]["candidates"]
    print(json.dumps({r["name"]: {"whole_pass": round(n / s, 1), "forward_clock": r["images_per_s"]}
                      for r, (n, s) in zip(ranked, whole)}))


def _busy(stop: mp.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        end = time.perf_counter() + rng.uniform(0.05, 0.3)
        while time.perf_counter() < end:
            pass
        time.sleep(rng.uniform(0.05, 0.3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--busy", action="store_true", help="another process on the same core, in random bursts")
    parser.add_argument("--round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round:
        return _round()
    stop = mp.Event()
    hog = mp.Process(target=_busy, args=(stop, 0), daemon=True) if args.busy else None
    if hog:
        hog.start()
    rows = []
    try:
        for i in range(args.rounds):
            run = subprocess.run([sys.executable, __file__, "--round"], check=True, capture_output=True, text=True)
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            speeds = ", ".join(f"{n[-5:]} {r['whole_pass']}/{r['forward_clock']}" for n, r in rows[-1].items())
            print(f"round {i} (images/s, whole pass/forward clock): {speeds}", flush=True)
    finally:
        stop.set()
    summary = {}
    for method in ("whole_pass", "forward_clock"):
        speeds = [[row[n][method] for n in NAMES] for row in rows]
        summary[method] = {
            "order_kept": sum(a > b > c for a, b, c in speeds), "lite0_fastest": sum(s[0] == max(s) for s in speeds),
            "cv": {n: round(statistics.pstdev(col) / statistics.mean(col), 3) for n, col in zip(NAMES, zip(*speeds))},
        }
        s = summary[method]
        print(f"{method}: order Lite0>Lite1>Lite2 in {s['order_kept']}/{len(rows)} rounds, Lite0 fastest in "
              f"{s['lite0_fastest']}/{len(rows)}; spread (cv) {s['cv']}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["busy" if args.busy else "quiet"] = {"rounds": rows, "summary": summary}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
