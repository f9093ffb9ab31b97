"""``data=photos``: seeded random crops of scikit-image's bundled colour photographs, one class per photo."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from finetune.data.photos import photo_crops
from finetune.data.sources.base import DataSplits, Source, Split, register, train_val_test

__all__ = ["Photos", "photos"]


@register("photos")
@dataclass
class Photos(Source):
    """Crops of astronaut, chelsea, coffee, motorcycle_left and rocket: real photo statistics, no download.

    See :func:`finetune.data.photos.photo_crops` for how crops are drawn.

    Attributes:
        photos: the photographs (classes), at least 2; None: all five.
        per_class: crops per photo before splitting; crops are drawn at ``image_size``.
        val_fraction, test_fraction: held out of the whole pool.
    """

    source: str = "photos"
    photos: Optional[List[str]] = None
    per_class: int = 60
    # The size of the crops themselves, and what ImageNet backbones were pretrained at.
    image_size: Optional[int] = 224
    # Crops are already 0.3-0.7 of a photo; a further crop must keep enough of one to tell it apart.
    scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: float = 0.5  # mirrored photos keep their class (crops are already flipped at random)
    num_workers: int = 0  # 300 in-memory arrays: worker start-up would cost more than it saves
    val_fraction: float = 0.25
    test_fraction: float = 0.25

    def load(self, seed: int) -> DataSplits:
        # The datamodule fills image_size from the backbone when it is None; a direct caller gets 224.
        size = self.image_size or 224
        names, items, labels = photo_crops(per_class=self.per_class, size=size, seed=seed, photos=self.photos)
        splits = train_val_test(Split(items, labels), self.val_fraction, self.test_fraction, seed)
        return DataSplits("photos", names, splits)


def photos(*, seed: int = 0, size: int | None = None, **fields: Any) -> DataSplits:
    """``Photos(image_size=size, **fields).load(seed)``."""
    if size is not None:
        fields["image_size"] = size
    return Photos(**fields).load(seed)
