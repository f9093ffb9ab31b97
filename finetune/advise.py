"""How much to fine-tune, from the data's size and its similarity to ImageNet.

``advise(cfg)`` measures the training split (its size, and its distance to the
pretraining data with :mod:`finetune.similarity`), picks one of the four quadrant recipes
and says why. ``+recipe=auto`` trains with that recipe; ``python -m finetune.advise``
only prints the advice (JSON on stdout).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from finetune.budget import budget_left_s
from finetune.errors import FineTuneError, run_command
from finetune.memory_format import apply_channels_last

if TYPE_CHECKING:  # Lightning (finetune.features imports it) takes seconds: --help should not wait
    from finetune.features import PrecomputedFeatures

__all__ = ["advise", "advise_or_fallback", "follow_advice", "main", "recipe_overrides"]

# Measures similarity when the backbone cannot: it has BatchNorm and installs offline.
REFERENCE_MODEL = "tf_efficientnet_lite0"


def _size(counts: list[int], small_below: int) -> dict[str, Any]:
    total = int(sum(counts))
    present = [c for c in counts if c > 0]
    return {
        "train_images": total,
        "classes": len(counts),
        "per_class_min": int(min(present)) if present else 0,
        "per_class_median": float(np.median(present)) if present else 0.0,
        "size": "small" if total < small_below else "large",
    }


def _measuring_model(cfg: DictConfig) -> tuple[torch.nn.Module, str, str]:
    """The pretrained model that measures similarity, its name, and why it was chosen.

    It is headless (``reset_classifier(0)``) like a FineTuneModule's backbone, so when it is the
    backbone its outputs are the features a ``head_only`` run trains on.
    """
    from finetune.backbones import create_backbone

    name = cfg.advise.get("similarity_model") or cfg.backbone.name
    why = "the backbone" if name == cfg.backbone.name else "advise.similarity_model"
    if name == cfg.backbone.name and not cfg.backbone.pretrained:
        name, why = REFERENCE_MODEL, "the backbone is not pretrained"
    weights = cfg.backbone.weights if name == cfg.backbone.name else None
    model = create_backbone(name, pretrained=True, weights=weights).model
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        name, why = REFERENCE_MODEL, f"{cfg.backbone.name} has no BatchNorm statistics"
        model = create_backbone(name, pretrained=True).model
    model.reset_classifier(0)
    return model, name, why


def advise(cfg: DictConfig, features: list[PrecomputedFeatures] | None = None) -> dict[str, Any]:
    """Measure the data of ``cfg`` and choose a recipe; see ``conf/advise/default.yaml`` for the knobs.

    Args:
        cfg: the composed config.
        features: if given, the measured sample's backbone features are appended to it, for the
            feature cache of the run that follows (``+recipe=auto``; see :class:`PrecomputedFeatures`).

    Returns:
        ``recipe``, ``size``, ``similarity``, ``reason``, ``measurements`` and ``thresholds``.
    """
    from finetune.builders import build_datamodule
    from finetune.config import compose
    from finetune.data import ImageDataModule
    from finetune.features import PrecomputedFeatures, split_fingerprint, state_digest
    from finetune.forward_clock import ForwardClock
    from finetune.ranking import MeasuredPass, candidate_names, rank_backbones, ranking_cost_share
    from finetune.short_budget import short_budget_choice, steps_down, training_seconds
    from finetune.similarity import measure_similarity
    from finetune.step_rates import measure_step_rates, timing_batch_size

    a = cfg.advise
    if str(a.trust_logme) not in ("all", "similar", "none"):
        raise FineTuneError(f"advise.trust_logme must be all, similar or none, got '{a.trust_logme}'")
    start = time.perf_counter()
    dm = build_datamodule(cfg)
    counts = dm.class_counts()["train"]
    if sum(1 for c in counts if c > 0) < 2:
        raise FineTuneError(f"the training split has {sum(1 for c in counts if c > 0)} class(es) with images; need 2")
    size = _size(counts, int(a.small_below))
    n = min(int(a.sample_size), size["train_images"])
    if n < int(a.min_sample):
        raise FineTuneError(
            f"{size['train_images']} training images are too few to measure similarity (advise.min_sample="
            f"{a.min_sample})"
        )

    before_model = time.perf_counter()  # what a model's build and sample pass cost: ranking repeats both
    model, measured_with, why = _measuring_model(cfg)
    # The memory format the run would give this network, so reused features equal what it would compute.
    channels_last = apply_channels_last(model, cfg.backbone.get("channels_last"))
    # The sample is preprocessed the way the measuring model was pretrained, at the data's size.
    measure_dm = ImageDataModule(dm.data, image_size=dm.image_size, backbone=measured_with)
    dataset = measure_dm.eval_dataset("train")
    idx = np.sort(np.random.default_rng(int(cfg.seed)).permutation(len(dataset))[:n])
    batches = (
        x.contiguous(memory_format=torch.channels_last) if channels_last else x
        for x, _ in DataLoader(Subset(dataset, idx.tolist()), batch_size=64)
    )
    first: list[torch.Tensor] = []  # a few images to time training steps on (finetune/step_rates.py)

    def keeping_first(xs: Any) -> Any:
        for x in xs:
            if not first:
                first.append(x[:timing_batch_size(dm.batch_size, x.shape[-2], x.shape[-1], len(x))].clone())
            yield x

    batches = keeping_first(batches)
    candidates = candidate_names(cfg)
    outputs: list[torch.Tensor] | None = [] if features is not None or candidates else None
    with ForwardClock(model) as clock:
        sim = measure_similarity(model, batches, outputs)
    per_candidate_s = time.perf_counter() - before_model
    measured = PrecomputedFeatures(
        split="train", fingerprint=split_fingerprint(dm.data.splits["train"]),
        data_config=measure_dm.data_config, digest=state_digest(model), channels_last=channels_last,
        indices=tuple(int(i) for i in idx), features=torch.cat(outputs),
    ) if outputs else None  # fmt: skip
    if sim.bn_divergence is None:
        raise FineTuneError(f"{measured_with} has no BatchNorm layers to measure similarity with")
    similar = sim.bn_divergence < float(a.similar_below)
    similarity = "similar" if similar else "dissimilar"
    recipe = f"{size['size']}_{similarity}"
    ranking = None
    recipe_cfg = compose([f"+recipe={recipe}"]) if candidates or cfg.get("budget") else None
    budgeted = recipe_cfg is not None and budget_left_s(cfg) is not None
    rates = None  # a training step's and an evaluation pass's images/s, where a budget needs them
    if budgeted and (candidates or steps_down(recipe_cfg, a)):
        rates = measure_step_rates(model, first[0])
    if candidates:
        training_s = training_seconds(dm.data, rates, budget_left_s(cfg)) if rates else None
        share = ranking_cost_share(recipe_cfg, dm.data, len(idx), len(candidates),
                                   budget=(per_candidate_s, training_s) if rates else None)
        if share > float(a.rank_max_share):  # the ranking would cost a large part of the run it informs
            of = (f"the {training_s:.0f} s of training the budget leaves" if rates
                  else f"the forward passes of {recipe}'s run")
            ranking = {"skipped": f"ranking would add {share:.0%} to {of} (advise.rank_max_share="
                                  f"{a.rank_max_share}): {cfg.backbone.name} trains"}
            candidates = []
    if candidates:  # which backbone trains: LogME of each candidate's features of this sample (finetune/ranking.py)
        own = (MeasuredPass(measured_with, measure_dm.data_config, channels_last, measured, clock.images_per_s,
                            sum(p.numel() for p in model.parameters())) if measured else None)
        trust = {"all": True, "similar": similar, "none": False}[str(a.trust_logme)]
        ranked_at = time.perf_counter()
        ranking, measured = rank_backbones(cfg, dm.data, idx, own, candidates, trust_logme=trust, rates=rates)
        ranking["cost"] = {"seconds": round(time.perf_counter() - ranked_at, 2), "share": round(share, 4),
                           "estimated_s": round((len(candidates) - 1) * per_candidate_s, 2),
                           **({"training_s_left": round(training_s, 1)} if rates else {})}
    if features is not None and measured is not None:
        features.append(measured)
    budget_strategy = None
    if budgeted:  # a short budget trains fewer layers
        chosen = next((r for r in (ranking or {}).get("candidates", []) if r["name"] == ranking.get("chosen")), None)
        if rates is not None and chosen:  # timed on the measuring model, scaled to the chosen one by forward speed
            rates = rates.scaled(chosen["images_per_s"] / clock.images_per_s)
        budget_strategy = short_budget_choice(recipe_cfg, dm.data, rates, budget_left_s(cfg), a,
                                              int(cfg.data.batch_size),
                                              int(cfg.trainer.get("accumulate_grad_batches") or 1))

    by_stage = [d for d in sim.bn_divergence_by_stage if d is not None]
    half = len(by_stage) // 2
    early, late = (float(np.mean(by_stage[:half])), float(np.mean(by_stage[half:]))) if half else (0.0, 0.0)
    depth = "late (semantic shift)" if late >= early else "early (input-level shift)"
    reason = (
        f"{size['train_images']} training images ({'<' if size['size'] == 'small' else '>='} {a.small_below}) and "
        f"BatchNorm divergence {sim.bn_divergence:.3f} ({'<' if similar else '>='} {a.similar_below}) from "
        f"ImageNet, largest {depth.split(' ')[0]}: {recipe}"
    )
    return {
        "recipe": recipe,
        "size": size["size"],
        "similarity": similarity,
        "reason": reason,
        "measurements": {
            **{k: v for k, v in size.items() if k != "size"},
            "data": dm.data.name,
            "image_size": dm.image_size,
            "sample_images": sim.images,
            "measured_with": measured_with,
            "measured_with_why": why,
            "bn_layers": sim.bn_layers,
            "bn_divergence": sim.bn_divergence,
            "bn_divergence_by_stage": sim.bn_divergence_by_stage,
            "shift_depth": depth,
            "seconds": round(time.perf_counter() - start, 2),
        },
        "thresholds": {"small_below": int(a.small_below), "similar_below": float(a.similar_below)},
        **({"backbones": ranking} if ranking else {}),
        **({"budget_strategy": budget_strategy} if budget_strategy else {}),
    }


def advise_or_fallback(cfg: DictConfig, features: list[PrecomputedFeatures] | None = None) -> dict[str, Any]:
    """:func:`advise`, or ``advise.fallback`` with the reason when the data cannot be measured and the user allows it."""
    try:
        return advise(cfg, features)
    except FineTuneError as e:
        fallback = cfg.advise.get("fallback")
        if not fallback:
            raise FineTuneError(f"{e} (set advise.fallback=RECIPE to train with a recipe of your choice)") from None
        return {"recipe": str(fallback), "size": None, "similarity": None,
                "reason": f"not measured ({e}); advise.fallback={fallback}", "measurements": {}, "thresholds": {}}


def recipe_overrides(overrides: Sequence[str], recipe: str) -> list[str]:
    """``overrides`` with their recipe replaced by ``recipe`` (the user's other choices kept)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("recipe=") and o.lstrip("+~") != "recipe"]
    return [*kept, f"+recipe={recipe}"]


def follow_advice(
    cfg: DictConfig, overrides: Sequence[str], run_dir: str | Path
) -> tuple[DictConfig, dict[str, Any], list[PrecomputedFeatures]]:
    """For ``+recipe=auto``: measure the data, write ``advice.json``, and compose the chosen recipe.

    Args:
        cfg: the config composed with ``overrides`` (``recipe: auto``).
        overrides: those overrides; the chosen recipe replaces ``+recipe=auto`` among them.
        run_dir: where ``advice.json`` goes.

    Returns:
        The config to train, the entries ``metrics.json`` gets (``recipe: auto``, the advised recipe
        and why), and the backbone features of the measured sample: a ``head_only`` recipe trains on
        them instead of running the backbone over the same images again.
    """
    from finetune.config import compose

    from finetune.advice_share import share_advice

    features: list[PrecomputedFeatures] = []  # rank 0's only: the others' feature cache extracts its share
    # Under torchrun/srun/ddp rank 0 alone measures and writes advice.json; the others follow it.
    advice = share_advice(run_dir, lambda: advise_or_fallback(cfg, features), float(cfg.advise.wait_timeout_s))
    print(f"advice: {advice['recipe']}: {advice['reason']}", flush=True)
    backbone = (advice.get("backbones") or {}).get("chosen")
    switch = []  # the ranked backbone trains (finetune/ranking.py); another backbone's weights file does not fit it
    if backbone and backbone != cfg.backbone.name:
        switch = [f"backbone.name={backbone}", *(["backbone.weights=null"] if cfg.backbone.weights else [])]
    ranked = advice.get("backbones") or {}  # chosen with a reason, or skipped with why
    if ranked:
        print(f"backbone: {ranked.get('reason') or ranked['skipped']}", flush=True)
    short = advice.get("budget_strategy") or {}  # finetune/short_budget.py; the user's freeze= wins
    if short:
        print(f"budget: {short['reason']}", flush=True)
    steps_down = bool(short.get("step_down")) and not any(o.lstrip("+~").split("=")[0] == "freeze" for o in overrides)
    if steps_down:
        switch.append(f"freeze={short['step_down']}")
    # With a budget the plan decides whether the LR finder fits (finetune.lr_find); the user's optim.lr wins.
    share = float(cfg.advise.lr_find_share)
    finds = bool(cfg.get("budget")) and share > 0 and not any(o.lstrip("+~").startswith("optim.lr=") for o in overrides)
    chosen = compose([*recipe_overrides(overrides, advice["recipe"]), *switch, *([f"optim.find_share={share}"] if finds else [])])
    extra = {"recipe": "auto", "advised_recipe": advice["recipe"], "advice": advice["reason"]}
    if backbone:
        extra["advised_backbone"] = backbone
    if steps_down:
        extra["advised_freeze"] = short["step_down"]
    return chosen, extra, features


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune.advise [data=... backbone=... advise.KEY=VALUE]``: the advice as JSON, no training."""
    from finetune.config import compose
    from finetune.help import print_help_if_asked

    if print_help_if_asked("advise", argv):  # before composing: Hydra's grammar rejects --help
        return

    def command(args: list[str]) -> None:
        print(json.dumps(advise_or_fallback(compose(args)), indent=2))

    run_command(command, argv)


if __name__ == "__main__":
    main()
