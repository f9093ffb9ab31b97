"""``data=digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no download)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from finetune.data.sources.base import (DataSplits, Source, per_class_subset, register, rgb_split,
                                            train_val_test)

__all__ = ["Digits", "digits"]


@register("digits")
@dataclass
class Digits(Source):
    """scikit-learn's digits; test and val are stratified, seeded fractions of all 1,797.

    Attributes:
        val_fraction, test_fraction: held out of the whole pool.
        train_per_class: N: train on a seeded random N images per class of the training split (val and
            test stay whole, so runs with different N are scored on the same images); None: all.
    """

    source: str = "digits"
    image_size: Optional[int] = 64  # 8x8 glyphs: going to 224 px costs 12x the compute and adds no information
    scale: List[float] = field(default_factory=lambda: [0.7, 1.0])  # crops must keep most of a glyph to keep its class
    ratio: List[float] = field(default_factory=lambda: [0.9, 1.1])
    hflip: float = 0.0  # a mirrored digit is not the same digit
    batch_size: int = 64
    num_workers: int = 0  # images are in memory and tiny: worker processes would cost more than they save
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    train_per_class: Optional[int] = None

    def load(self, seed: int) -> DataSplits:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Values are 0..16 ink intensity; scale to 8-bit and repeat into RGB.
        gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        splits = train_val_test(rgb_split(gray, bunch.target.astype(np.int64)), self.val_fraction,
                                self.test_fraction, seed)
        splits["train"], notes = per_class_subset(splits["train"], self.train_per_class, seed, 10)
        return DataSplits("digits", [str(i) for i in range(10)], splits, notes)


def digits(seed: int = 0, **fields: Any) -> DataSplits:
    """``Digits(**fields).load(seed)``, the function this source was before it had a config."""
    return Digits(**fields).load(seed)
