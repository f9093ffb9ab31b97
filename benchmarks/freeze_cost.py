"""Cost follows the freeze: training images/s, step time and memory of freeze strategies, side by side,
and the speed-up the course's cost model predicts (finetune.layer_size.freeze_cost) beside the measured one.

    python benchmarks/freeze_cost.py [--backbone tf_efficientnet_lite0] [--image-size 224] [--batch-size 16]
    python benchmarks/freeze_cost.py --backbone resnet18 --no-pretrained   (dense convolutions, for contrast)

Each strategy runs in its own fresh process (so peak memory is its own), one after the
other in this one invocation, on the same random batch, with the same optimizer setup as
FineTuneModule. Prints a table and the ratios against ``none`` and writes JSON.

``head_only (cached)`` is what ``finetune`` runs for ``freeze=head_only augment=none``
(see finetune.features): one backbone pass over the epoch's images, then ``--epochs``
epochs of head steps on the features; its images/s counts every epoch's images over the
whole time, extraction included.

The prediction counts add-multiplies per training image: 1x each connection before the first trainable
layer, 3x from it on (forward, and the two products of backward), and for the cached run the
backbone's 1x once, spread over ``--epochs``. ``predicted x none`` is none's count over the
strategy's; ``measured x none`` the ratio of images/s. Where they differ, the clock is paying for
something other than multiply-adds (docs/performance-size.md).

``bitfit``, ``norm`` and ``lora`` train parameters spread through the whole network: backward runs
through every layer, but computes weight gradients only for biases, norms or the adapters. The
connection count (1x before the first trainable layer, 3x from it) has no term for that, so their
prediction is left out ("n/a") and only what was measured is shown.

Memory, per strategy: ``peak MiB`` is the device's peak during the run (GPU: torch.cuda.max_memory_allocated;
CPU: the process's peak RSS, ru_maxrss, which includes Python, torch and the model); ``train MiB`` is that peak
less what was in use just before the first training step (the built model and optimizer, no state yet):
activations kept for backward, gradients, optimizer state. On CPU, ru_maxrss is the lifetime peak, so a
model build that peaked higher than training would make ``train MiB`` a lower bound (it is then flagged).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import resource
import time
from pathlib import Path

STRATEGIES = {
    "head_only (cached)": {"name": "head_only", "cached": True},
    "head_only": {"name": "head_only"},
    "top_stages(n=2)": {"name": "top_stages", "n": 2},
    "bitfit": {"name": "bitfit"},
    "norm": {"name": "norm"},
    "lora": {"name": "lora"},  # peft's defaults of finetune.lora (r=8); needs the lora extra
    "none": {"name": "none"},
}
# Their trainable parameters sit in every layer: the connection-based prediction does not model them.
NO_PREDICTION = {"bitfit", "norm", "lora"}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _measure(args: argparse.Namespace, freeze: dict, queue: mp.Queue) -> None:
    import torch

    from finetune import FineTuneModule
    from finetune.layer_size import freeze_cost, size_table, trainable_names
    from finetune.optim import param_groups

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    freeze = dict(freeze)
    cached = freeze.pop("cached", False)
    m = FineTuneModule(args.backbone, num_classes=10, pretrained=args.pretrained, freeze=freeze,
                       channels_last=args.channels_last).to(device)
    table = size_table(m, args.image_size)
    cost = freeze_cost(table, trainable_names(m, m.freeze_plan, 0), cached=cached)
    m.train()
    opt = torch.optim.AdamW(param_groups(m.backbone, m.head, m.freeze_plan, 1e-3, 0.1, 0.01))
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def step(inputs: torch.Tensor = x) -> None:
        loss = m.criterion(m(inputs), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cached_run() -> None:
        # As FeatureDataModule does it: features of the epoch's batches once, then head epochs.
        with torch.no_grad():
            m.backbone.eval()
            feats = [m.backbone(x) for _ in range(args.steps)]
        for _ in range(args.epochs):
            for f in feats:
                step(f)

    # What is in use before the first step: the built model and optimizer (its state is created lazily).
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(args.warmup):
        step()
    base_rss = _rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if cached:
        cached_run()
    else:
        for _ in range(args.steps):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    steps = (args.epochs if cached else 1) * args.steps
    queue.put(
        {
            "images_per_s": steps * args.batch_size / elapsed,
            "ms_per_step": 1000 * elapsed / steps,
            "peak_memory_mib": peak,
            "train_memory_mib": peak - base,
            # CPU: ru_maxrss had already passed the training peak before the first step (a lower bound then).
            "train_memory_lower_bound": device.type != "cuda" and peak_before >= peak,
            "rss_before_timing_mib": base_rss,
            "trainable_params": m.trainable_params(),
            "predicted_macs_per_image": cost.macs_per_image(args.epochs if cached else 1),
            "units_kept": cost.units_kept,
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
    )


def _result(label: str, proc: mp.process.BaseProcess, q: mp.Queue) -> dict:
    """The child's measurement; an error if it died without one (else ``q.get()`` would wait forever)."""
    while True:
        try:
            return q.get(timeout=10)
        except queue.Empty:
            if not proc.is_alive():
                raise SystemExit(f"{label}: the measuring process exited with code {proc.exitcode} and no result")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5, help="epochs of the cached head_only run")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="pretrained weights (--no-pretrained: random ones, where none are at hand)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "freeze_cost.json"))
    args = p.parse_args()

    ctx = mp.get_context("spawn")
    results = {}
    for label, freeze in STRATEGIES.items():
        q: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(args, freeze, q))
        proc.start()
        results[label] = _result(label, proc, q)
        proc.join()

    ref = results["none"]
    print(f"{args.backbone} at {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps, "
          f"device {ref['device']} ({ref['threads']} threads), {platform.processor() or platform.machine()}, "
          f"channels_last={args.channels_last}, {'pretrained' if args.pretrained else 'random'} weights")
    mem_label = "peak GPU MiB" if ref["device"].startswith("cuda") else "peak RSS MiB"
    print(f"{'strategy':<20} {'trainable':>12} {'MACs/image':>14} {'predicted x none':>17} {'images/s':>10} "
          f"{'ms/step':>9} {'measured x none':>16} {mem_label:>13} {'train MiB':>10} {'x none':>7}")
    for label, r in results.items():
        r["speed_vs_none"] = r["images_per_s"] / ref["images_per_s"]
        predicted = label not in NO_PREDICTION
        r["predicted_speed_vs_none"] = ref["predicted_macs_per_image"] / r["predicted_macs_per_image"] if predicted else None
        r["memory_vs_none"] = r["peak_memory_mib"] / ref["peak_memory_mib"]
        r["train_memory_vs_none"] = r["train_memory_mib"] / ref["train_memory_mib"]
        macs = f"{r['predicted_macs_per_image']:>14,.0f}" if predicted else f"{'n/a':>14}"
        speed = f"{r['predicted_speed_vs_none']:>17.2f}" if predicted else f"{'n/a':>17}"
        train_mib = f"{r['train_memory_mib']:.0f}" + ("+" if r["train_memory_lower_bound"] else "")
        print(f"{label:<20} {r['trainable_params']:>12,} {macs} {speed} {r['images_per_s']:>10.1f} "
              f"{r['ms_per_step']:>9.0f} {r['speed_vs_none']:>16.2f} {r['peak_memory_mib']:>13.0f} "
              f"{train_mib:>10} {r['train_memory_vs_none']:>7.2f}")
    if any(r["train_memory_lower_bound"] for r in results.values()):
        print("train MiB with +: the process had peaked higher before training (ru_maxrss), a lower bound")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
