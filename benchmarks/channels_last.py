"""Channels-last against the default memory format: training and evaluation images/s, side by side.

    python benchmarks/channels_last.py [--rounds 3] [--threads N] [--out benchmarks/results/channels_last.json]

For each backbone, resolution and batch size, one training step (forward, backward, AdamW, every
layer trainable) and one evaluation forward, timed alternately in both formats (``--rounds``
rounds of 3 steps after 2 warm-up steps; the best round counts, as timeit does). Random weights:
speed does not depend on them. Prints channels-last / default ratios (above 1: channels-last is
faster) and what ``backbone.channels_last=null`` chooses (finetune.memory_format).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

CASES = [  # (timm name, resolution, batch)
    ("tf_efficientnet_lite0", 32, 128),  # Fashion-MNIST's size under +recipe=auto
    ("tf_efficientnet_lite0", 224, 32),
    ("mobilenetv3_large_100", 64, 64),
    ("convnext_atto", 64, 64),
    ("resnet18", 64, 64),
    ("resnet18", 224, 32),
    ("vit_tiny_patch16_224", 224, 32),
]


def _rates(model, x, y, channels_last: bool, steps: int = 3) -> tuple[float, float]:
    import torch

    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def train() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(2):
        train()
    t = time.perf_counter()
    for _ in range(steps):
        train()
    train_s = (time.perf_counter() - t) / steps
    model.eval()
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
    eval_s = (time.perf_counter() - t) / steps
    return len(x) / train_s, len(x) / eval_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/channels_last.json"))
    args = p.parse_args()
    import timm
    import torch

    from finetune.memory_format import is_convolutional

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'backbone':<24}{'px':>5}{'batch':>6}{'train cl/default':>18}{'eval cl/default':>17}  null chooses")
    for name, res, batch in CASES:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        x, y = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))
        best = {False: [0.0, 0.0], True: [0.0, 0.0]}
        for _ in range(args.rounds):
            for cl in (False, True):
                tr, ev = _rates(model, x, y, cl)
                best[cl] = [max(best[cl][0], tr), max(best[cl][1], ev)]
        row = {"backbone": name, "resolution": res, "batch": batch,
               "train_img_s": {"default": best[False][0], "channels_last": best[True][0]},
               "eval_img_s": {"default": best[False][1], "channels_last": best[True][1]},
               "train_ratio": best[True][0] / best[False][0], "eval_ratio": best[True][1] / best[False][1],
               "null_chooses_channels_last": is_convolutional(model)}
        rows.append(row)
        print(f"{name:<24}{res:>5}{batch:>6}{row['train_ratio']:>17.2f}x{row['eval_ratio']:>16.2f}x  "
              f"{'channels_last' if row['null_chooses_channels_last'] else 'default'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
