"""The settings of ``+recipe=auto`` and ``python -m finetune.advise`` (composed into :class:`finetune.config.Config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from finetune.offline_weights import offline_candidates

__all__ = ["AdviseConfig"]


@dataclass
class AdviseConfig:
    """How ``+recipe=auto`` and ``python -m finetune.advise`` measure the data and pick a recipe.

    Attributes:
        sample_size: training images measured (a seeded sample): seconds on a CPU.
        min_sample: fewer images than this are too few to measure.
        small_below: BiT-HyperRule's boundary (Kolesnikov et al. 2020): under 20k training images is "small".
        similar_below: BatchNorm divergence from ImageNet, measured with tf_efficientnet_lite0 (256 images):
            photo crops 0.03 (224 px), digits 0.35 (64 px), Fashion-MNIST 0.45 (32 px).
        similarity_model: None: the backbone itself (tf_efficientnet_lite0 when it has no BatchNorm or
            is not pretrained); or a timm name with pretrained BatchNorm.
        fallback: a recipe to train with when the data cannot be measured; None: stop with an error.
        candidates: backbones ranked by LogME on the measured sample (finetune/ranking.py); the chosen one
            trains. Default: EfficientNet-Lite0/1/2 where their offline packages are installed (the
            ``candidates`` extra), else none; any timm names where the hub is reachable. Empty or null: the
            given backbone trains without ranking. The given backbone is always ranked too.
        trust_logme: where LogME's order chooses the backbone: ``all`` data, data ``similar`` to ImageNet, or
            ``none``; elsewhere the fastest candidate trains. On digits and Fashion-MNIST (dissimilar, fully
            fine-tuned) LogME's order did not match the fine-tuned accuracy (docs/auto-budget.md).
        rank_max_share: rank only when the other candidates' passes over the sample cost at most this share of
            the forward passes of the recipe's run (photos: head_only on cached features is one pass, ranking 2);
            under ``budget=``, of the seconds of training steps the budget leaves (finetune/ranking.py).
        logme_margin: the cheapest candidate within this much LogME (per-image log evidence) of the best wins.
        cost_weight: LogME subtracted per doubling of time per image (0: cost only breaks near-ties).
        speed_tolerance: candidates measured within this share of the fastest count as fast as it, and the one
            with the fewest parameters goes first: beside another run, Lite1 measured 1.19x and 1.25x faster
            than Lite0 (which runs 1.3x faster alone), and the runs that trained it did not fit ``budget=1m``.
        lr_find_share: with ``budget=``, auto runs the LR finder when it fits this share of the budget; 0: never.
        min_epochs_in_budget: with ``budget=``, candidates that cannot train this many epochs in what is left of it
            (at the measured training and evaluation rates) drop out of the ranking; the fastest stays if none can.
        min_schedule_multiple: with ``budget=``, a recipe that trains every layer (``freeze=none``) trains
            ``short_budget_freeze`` instead when the budget affords fewer than ``min_full_steps`` optimizer
            steps and less than this multiple of the recipe's epochs (finetune/short_budget.py); null: steps
            alone. At 10/class, in the same time as ``top_stages``, full fine-tuning lost up to 36 points below
            1.6x the recipe's epochs and won by 2.8-4.4 (digits) or tied (Fashion-MNIST) at 2.6-3.4x.
        min_full_steps: BiT-HyperRule's shortest fine-tuning schedule (500 steps, for under 20k images).
        short_budget_freeze: the strategy a short budget steps down to; null: never step down.
        linear_probe_below_steps: where the budget affords fewer than this many optimizer steps (of full
            fine-tuning, as estimated) the step-down trains the head alone (``head_only``, a linear probe)
            instead; null: never. Measured (docs/auto-budget.md): Fashion-MNIST at 10/class and ``budget=1m``,
            1-3 steps estimated, ``head_only`` 60.6% against ``top_stages`` 43.3%; at 100/class (27 estimated)
            and digits at 10/class (34), ``top_stages`` won by 7 and 10 points. Any value from 4 to 27 makes
            these three choices; 10 is chosen within that window, not fitted to one point.
        wait_timeout_s: under torchrun/srun/ddp, how long the other processes wait for rank 0's advice
            (finetune/advice_share.py); torch's default process-group timeout for gloo.
    """

    sample_size: int = 256
    min_sample: int = 20
    small_below: int = 20000
    similar_below: float = 0.2
    similarity_model: Optional[str] = None
    fallback: Optional[str] = None
    candidates: Optional[List[str]] = field(default_factory=offline_candidates)
    trust_logme: str = "similar"
    rank_max_share: float = 0.1
    logme_margin: float = 0.01
    cost_weight: float = 0.0
    speed_tolerance: float = 0.3
    lr_find_share: float = 0.1
    min_epochs_in_budget: int = 3
    min_schedule_multiple: Optional[float] = 2.0
    min_full_steps: int = 500
    short_budget_freeze: Optional[str] = "top_stages"
    linear_probe_below_steps: Optional[int] = 10
    wait_timeout_s: float = 1800.0
