"""Which backbone ``+recipe=auto`` trains: candidates ranked by LogME on the advice's sample, weighed by cost.

Each candidate of ``advise.candidates`` (the given backbone is always one of them) runs the
advice's seeded sample of training images at the resolution it would train at (``data.image_size``,
else its own pretrained input size), and its pooled features are scored with
:func:`finetune.logme.logme`. Its forward calls are timed (images/s, by
:class:`finetune.forward_clock.ForwardClock`): the cost of every forward pass through that
backbone. :func:`choose_backbone` then applies one rule, documented there, and ``advice.json``
lists every candidate with its score, images/s and the choice.

The candidate that measured similarity is not run twice: its pass is the advice's own, timed the
same way (every candidate's pass collects BatchNorm statistics, so the timings compare).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from finetune.backbones import create_backbone
from finetune.budget import budget_left_s
from finetune.data import DataSplits, ImageDataModule
from finetune.errors import FineTuneError
from finetune.forward_clock import ForwardClock
from finetune.features import PrecomputedFeatures, split_fingerprint, state_digest
from finetune.logme import logme
from finetune.memory_format import apply_channels_last
from finetune.similarity import measure_similarity
from finetune.step_rates import StepRates

__all__ = ["CandidateScore", "MeasuredPass", "candidate_names", "choose_backbone", "forward_passes", "rank_backbones",
           "ranking_cost_share"]


@dataclass
class MeasuredPass:
    """The advice's own pass over the sample: who ran it, at which preprocessing, its outputs and speed."""

    name: str
    data_config: dict[str, Any]
    channels_last: bool
    features: PrecomputedFeatures
    images_per_s: float
    params: int  # the backbone's, classifier removed


@dataclass
class CandidateScore:
    """One row of ``advice.json``'s ``backbones.candidates``."""

    name: str
    logme: float
    images_per_s: float
    image_size: int
    num_features: int
    weights: str
    params: int


def candidate_names(cfg: DictConfig) -> list[str]:
    """The backbones to rank: ``advise.candidates`` with the given backbone first; none when ranking is off.

    Off when ``advise.candidates`` is empty or null (the given backbone trains, as before), and
    when the backbone is not pretrained (the candidates are choices of pretrained features).
    """
    names = [str(n) for n in (cfg.advise.get("candidates") or [])]
    if not names or not cfg.backbone.pretrained:
        return []
    return list(dict.fromkeys([str(cfg.backbone.name), *names]))


def choose_backbone(
    scores: Mapping[str, float],
    imgs_per_s: Mapping[str, float],
    budget_s: float | None = None,
    *,
    margin: float = 0.01,
    cost_weight: float = 0.0,
    work_images: int | None = None,
    trust_logme: bool = True,
    params: Mapping[str, int] | None = None,
    speed_tolerance: float = 0.0,
) -> tuple[str, str]:
    """The backbone to train, and why: pure, so a budget planner can call it with its own numbers.

    The rule, in order, over the candidates fastest first, except that those within ``speed_tolerance`` of
    the fastest count as fast as it and go by ``params``, fewest first (a shared host's timings are noisy;
    a parameter count is not):

    1. With ``budget_s`` and ``work_images`` (the images the plan sends through the backbone),
       candidates that cannot pass ``work_images`` within ``budget_s`` drop out (the first in that
       order stays if none can).
    2. ``trust_logme=False`` (data where LogME was measured to rank badly): the fastest remaining.
    3. Each candidate's utility is its LogME minus ``cost_weight`` per doubling of time per image
       relative to the fastest; the cheapest candidate within ``margin`` of the best utility wins.
       LogME is a per-image log evidence: ``margin`` is in those units.

    Args:
        scores: LogME per candidate name.
        imgs_per_s: measured images/s per candidate name (higher is cheaper).
        params: parameters per candidate name, for ``speed_tolerance``.

    Raises:
        FineTuneError: no candidates, or scores and speeds for different names.
    """
    if not scores or set(scores) != set(imgs_per_s):
        raise FineTuneError(f"choose_backbone needs a score and a speed for each candidate, got {scores}, {imgs_per_s}")
    names = _cheapest_first(imgs_per_s, params, speed_tolerance)
    fastest = names[0]
    first = "the fastest" if fastest == max(names, key=lambda n: imgs_per_s[n]) else \
        f"the fewest parameters within {speed_tolerance:g} of the fastest's images/s (advise.speed_tolerance)"
    notes = []
    if budget_s is not None and work_images:
        fits = [n for n in names if work_images / imgs_per_s[n] <= budget_s]
        dropped = [n for n in names if n not in fits]
        if dropped:
            notes.append(f"{', '.join(dropped)} cannot pass {work_images} images in {budget_s:g} s")
        names = fits or [fastest]
    if not trust_logme:
        which = first if names[0] == fastest else "the fastest that fits"
        reason = "; ".join([*notes, f"{names[0]}: {which} (LogME not used for this data: advise.trust_logme)"])
        return names[0], reason
    top_speed = max(imgs_per_s[n] for n in names)
    utility = {n: scores[n] - cost_weight * math.log2(top_speed / imgs_per_s[n]) for n in names}
    best = max(names, key=lambda n: utility[n])
    chosen = next(n for n in names if utility[n] >= utility[best] - margin)
    if chosen == best:
        why = f"{chosen}: highest LogME {scores[chosen]:.4f}"
        if cost_weight:
            why += f" after a cost of {cost_weight:g} per doubling of time per image"
    else:
        why = (f"{chosen}: LogME {scores[chosen]:.4f} within {margin:g} of {best}'s {scores[best]:.4f}, "
               f"at {imgs_per_s[chosen] / imgs_per_s[best]:.1f}x its images/s")
    return chosen, "; ".join([*notes, why])


def _cheapest_first(imgs_per_s: Mapping[str, float], params: Mapping[str, int] | None, tolerance: float) -> list[str]:
    """Names fastest first; those within ``tolerance`` of the fastest first of all, fewest parameters first."""
    by_speed = sorted(imgs_per_s, key=lambda n: -imgs_per_s[n])
    if not params or tolerance <= 0:
        return by_speed
    top = imgs_per_s[by_speed[0]]
    tied = sorted((n for n in by_speed if imgs_per_s[n] * (1 + tolerance) >= top), key=lambda n: params[n])
    return [*tied, *(n for n in by_speed if n not in tied)]


@torch.no_grad()
def _run_candidate(
    cfg: DictConfig, name: str, data: DataSplits, idx: np.ndarray, measured: MeasuredPass | None
) -> tuple[PrecomputedFeatures, float, str, int]:
    """The candidate's features of the sample, its forward images/s, where its weights came from, its parameters."""
    cdm = ImageDataModule(data, image_size=cfg.data.get("image_size"), backbone=name)
    setting = cfg.backbone.get("channels_last")
    # With setting None both passes resolve the same network the same way (finetune.memory_format).
    if (measured is not None and measured.name == name and measured.data_config == cdm.data_config
            and (setting is None or measured.channels_last == bool(setting))):
        return measured.features, measured.images_per_s, "the advice's pass", measured.params
    weights = cfg.backbone.weights if name == cfg.backbone.name else None
    built = create_backbone(name, pretrained=True, weights=weights)
    model = built.model
    model.reset_classifier(0)
    channels_last = apply_channels_last(model, setting)
    loader = DataLoader(Subset(cdm.eval_dataset("train"), idx.tolist()), batch_size=64)
    # Timed as the advice's pass is: the forward calls, BatchNorm statistics included.
    images = (x.contiguous(memory_format=torch.channels_last) if channels_last else x for x, _ in loader)
    outputs: list[torch.Tensor] = []
    with ForwardClock(model) as clock:
        measure_similarity(model, images, outputs)
    feats = PrecomputedFeatures(
        split="train", fingerprint=split_fingerprint(data.splits["train"]), data_config=cdm.data_config,
        digest=state_digest(model), channels_last=channels_last, indices=tuple(int(i) for i in idx),
        features=torch.cat(outputs),
    )
    return feats, clock.images_per_s, built.weights_source, sum(p.numel() for p in model.parameters())


def forward_passes(data: DataSplits, epochs: int) -> int:
    """Forward passes of ``epochs`` epochs: a training image costs about three (the backward pass about two:
    Kaplan et al. 2020), each epoch validates, and the test split is passed once."""
    n = {split: len(items) for split, items in data.splits.items()}
    return epochs * (3 * n.get("train", 0) + n.get("val", 0)) + n.get("test", 0)


def _budget_work(
    cfg: DictConfig, data: DataSplits, rates: StepRates | None = None, images_per_s: float | None = None
) -> tuple[float | None, int | None]:
    """Under ``budget=``: the seconds left, and the work ``advise.min_epochs_in_budget`` epochs need, in forward
    passes of the sample pass (a candidate fits when ``work / its images_per_s`` is within what is left).

    With the measuring model's ``rates`` (:func:`finetune.step_rates.measure_step_rates`) and its sample
    pass's ``images_per_s``, the work is those epochs' seconds at those rates, times that speed: each
    candidate's rates are taken to scale with its sample pass's speed. Without them, a training image
    counts three forward passes (:func:`forward_passes`). On Fashion-MNIST at 32 px (1,000/class, 3
    epochs) the two agree within 3% (100,517 forward passes measured, 103,600 by the rule): the sample
    pass's BatchNorm hooks slow it about as much as a training step exceeds three plain forwards. The
    rule is kept as the fallback, not trusted elsewhere: the ratio differs with resolution and device.
    """
    left_s = budget_left_s(cfg)
    if left_s is None:
        return None, None
    epochs = int(cfg.advise.get("min_epochs_in_budget", 3))
    if rates is None or not images_per_s:
        return left_s, forward_passes(data, epochs)
    return left_s, int(round(rates.run_seconds(data, epochs) * images_per_s))


def ranking_cost_share(
    recipe: DictConfig, data: DataSplits, sample: int, candidates: int, budget: tuple[float, float] | None = None
) -> float:
    """What ranking adds to the run it informs (``advise.rank_max_share``).

    Without a budget, in forward passes: ranking passes the sample through every candidate but the one
    that measured similarity. The run passes every split once where it trains a head on cached features
    (``head_only``, ``augment=none``), else each epoch's training images three times (forward and
    backward) and val once, and test once. Both are counted in images, at the measuring backbone's cost
    per image (candidates cost more).

    Under ``budget=``, ``budget`` is (seconds the measuring backbone took to build and pass the sample,
    seconds of training the budget leaves it): the share is ranking's seconds, each other candidate
    counted at the first figure, over that training. Every second of ranking comes out of training
    (evaluation's share is fixed by the data), and where evaluation takes most of a short budget, a
    share of the whole run hides it: Fashion-MNIST at 10/class with ``budget=1m`` passes 11,200 val and
    test images and trains 100 an epoch, so ranking Lite1 and Lite2 was 0.2% of the run's passes, but it
    took 1.95 s where the budget left about 2 s of training steps. Candidates are larger than the
    measuring backbone, so the estimate runs short: 1.33 s estimated against 1.95 s taken there, 2.29 s
    against 3.77 s at 1,000/class. Where the budget leaves the measuring backbone no training, the share
    is 0: only ranking can find a cheaper backbone that fits.
    """
    if budget is not None:
        per_candidate_s, training_s = budget
        return 0.0 if training_s <= 0 else (candidates - 1) * per_candidate_s / training_s
    if str(recipe.freeze.name) == "head_only" and str(recipe.augment.name) == "none" and recipe.cache_features:
        work = sum(len(items) for items in data.splits.values())
    else:
        work = forward_passes(data, int(recipe.trainer.max_epochs))
    return (candidates - 1) * sample / max(1, work)


def rank_backbones(
    cfg: DictConfig, data: DataSplits, idx: np.ndarray, measured: MeasuredPass | None = None,
    names: Sequence[str] | None = None, trust_logme: bool = True, rates: StepRates | None = None,
) -> tuple[dict[str, Any], PrecomputedFeatures]:
    """Score every candidate on the sample ``idx`` of ``data``'s train split and choose one.

    ``trust_logme=False``: the scores are reported but the fastest candidate (that fits the budget) trains.
    ``rates``: the measuring model's training and evaluation rates, for what fits the budget (:func:`_budget_work`).

    Returns:
        The ``backbones`` entry of the advice (``candidates``, ``chosen``, ``reason``, ``rule``) and
        the chosen candidate's features of the sample (for the feature cache of the run).
    """
    a = cfg.advise
    labels = np.asarray(data.splits["train"].labels)[idx]
    rows: list[CandidateScore] = []
    features: dict[str, PrecomputedFeatures] = {}
    for name in names if names is not None else candidate_names(cfg):
        feats, images_per_s, weights, n_params = _run_candidate(cfg, name, data, idx, measured)
        features[name] = feats
        rows.append(CandidateScore(
            name=name, logme=round(logme(feats.features.numpy(), labels), 5),
            images_per_s=round(images_per_s, 1), image_size=int(feats.data_config["image_size"]),
            num_features=int(feats.features.shape[1]), weights=weights, params=int(n_params),
        ))  # fmt: skip
    scores = {r.name: r.logme for r in rows}
    speeds = {r.name: r.images_per_s for r in rows}
    margin, cost_weight = float(a.get("logme_margin", 0.01)), float(a.get("cost_weight", 0.0))
    budget_s, work = _budget_work(cfg, data, rates, measured.images_per_s if measured else None)
    tolerance = float(a.get("speed_tolerance", 0.0))
    chosen, reason = choose_backbone(scores, speeds, budget_s=budget_s, margin=margin, cost_weight=cost_weight,
                                     work_images=work, trust_logme=trust_logme,
                                     params={r.name: r.params for r in rows}, speed_tolerance=tolerance)
    entry = {
        "candidates": [asdict(r) for r in rows],
        "chosen": chosen,
        "reason": reason,
        "rule": {"logme_margin": margin, "cost_weight": cost_weight, "speed_tolerance": tolerance,
                 "sample_images": int(len(idx)), "logme_used": trust_logme,
                 **({"budget_left_s": round(budget_s, 1), "forward_images_needed": work} if work else {}),
                 **({"step_rates": rates.to_dict()} if work and rates else {})},
    }
    return entry, features[chosen]
