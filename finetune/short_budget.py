"""Under a short ``budget=``, ``+recipe=auto`` trains fewer layers than its recipe would.

The recipes' schedules follow BiT-HyperRule (Kolesnikov et al. 2020): ``small_dissimilar`` fine-tunes
every layer for 25 epochs. A budget can afford a fraction of that; the planner then shortens the
schedule so that it completes on time (finetune/budget.py), but a whole network trained for a few
epochs from a random head is where full fine-tuning does worst: the head's first, random gradients
reach every pretrained layer (Kumar et al. 2022, "Fine-tuning can distort pretrained features"), and
too few steps remain to recover. The course's rule extends from examples to steps: with less to learn
from, keep more of the pretrained weights fixed. So where the recipe trains every layer
(``freeze=none``) and the budget affords it fewer than ``advise.min_full_steps`` optimizer steps (500:
BiT-HyperRule's shortest schedule, the one it gives data sets under 20k images) and less than
``advise.min_schedule_multiple`` (2) times the recipe's epochs, ``advise.short_budget_freeze`` trains
instead (``top_stages``: the last stages adapt, as dissimilar data needs; each step is cheaper, so
1.7-2.1x the steps fit in the same time). The planner still plans the chosen strategy's epochs from
its own measured step time, and stretches them to fill the budget.

Both conditions, measured with the same budget for both strategies (comparison sweeps, and pairs of
auto runs side by side; docs/auto-budget.md; ``none`` minus ``top_stages``, test points):

- Thousands of steps leave full fine-tuning time to recover even when the schedule is cut: on full
  Fashion-MNIST (60 minutes, 0.4x the recipe's epochs, about 3,400 steps) ``none`` won by 1.3.
- Few steps and a cut schedule: ``none`` lost 2.2 on Fashion-MNIST at 1,000/class (0.07x the epochs,
  136 steps), 2.9 at 100/class (0.3x).
- Around the recipe's length (10/class, two rounds of pairs, ``benchmarks/step_down_turn.py``): below
  1.6x its epochs full fine-tuning can collapse when the host gives it few steps (Fashion-MNIST at 1.5x:
  -35.7 with 12 steps; -7.8 and -9.7 at 1.1-1.3x; digits -7.5 at 1.1x), while ``top_stages`` was never
  more than 0.3 behind. At 2.6-3.4x full fine-tuning won on digits (+2.8, +4.4) and tied on
  Fashion-MNIST (+0.3, -0.8). At 1.8-2.0x the four pairs split both ways (Fashion-MNIST -1.2, +0.2;
  digits +1.7, -0.3). So the default, 2, lies in the window (1.6 to 2.6) that makes the clear choices at
  both ends; between, either choice cost up to 1.7 points. Measured, the step-down below 2 cost at most
  1.7 (digits at 1.8x), keeping ``none`` above it at most 0.8.
  Steps alone (null) lost 2.8-4.4 on digits at 2.6-2.9x; the whole schedule alone (1) lost 7.8-35.7 on
  Fashion-MNIST at 1.1-1.5x.

Where the budget affords fewer than ``advise.linear_probe_below_steps`` (10) steps, not even the last
stages can move usefully from a random head, and the head alone trains (``head_only``, a linear probe;
the first phase of Kumar et al.'s LP-FT). Fashion-MNIST at 10/class with ``budget=1m`` afforded 1-3
while every epoch validated (it now affords about 30, finetune/budget.py's ``val_interval``):
there ``head_only`` reached 60.6% and ``top_stages`` 43.3%; at 100/class (27 steps) and digits at
10/class (34), ``top_stages`` won by 7 and 10 points. Any threshold from 4 to 27 makes those three
choices; 10 lies inside that window and is not fitted to a single point, but three points on two data
sets are all the evidence there is.

The epochs afforded are an estimate made before any training step, from rates measured on a copy of
the backbone (:func:`finetune.step_rates.measure_step_rates`): an epoch costs its training images at
the training rate and its validation images at the evaluation rate (as often as the planner validates:
every epoch, or every few where that would crowd out training), and the test split is passed once.
Per-epoch overheads (loader start, checkpoints) are left out, so the estimate leans optimistic. It
used to scale the advice's sample pass by three forward passes per training image, and came out
1.5-1.8x short of the epochs the planner fitted (digits at 50/class: 5.7 estimated, 9 planned for
``none``).
Steps are epochs times an epoch's optimizer steps (its ``ceil(train images / data.batch_size)``
batches over ``trainer.accumulate_grad_batches``, as :func:`finetune.budget.optimizer_steps` counts
them for the plan). ``advice.json`` records the rates, the estimate, the rule and the choice;
``metrics.json``'s ``budget`` the epochs actually planned.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from finetune.budget import optimizer_steps
from finetune.data import DataSplits
from finetune.errors import FineTuneError
from finetune.step_rates import StepRates
from finetune.strategies import STRATEGIES

__all__ = ["epochs_affordable", "short_budget_choice", "steps_down", "training_seconds"]

# Only a recipe that trains every layer steps down; the others already train a part.
STEPS_DOWN_FROM = "none"
# Where even a step-down's layers could hardly move (advise.linear_probe_below_steps): the head alone.
LINEAR_PROBE = "head_only"


def epochs_affordable(data: DataSplits, rates: StepRates, seconds_left: float) -> float:
    """Epochs of training (validation as the planner does it, one test pass) that ``seconds_left`` holds at ``rates``;
    0 when even the test pass does not fit."""
    once = rates.run_seconds(data, 0)
    return max(0.0, (seconds_left - once) / max(rates.run_seconds(data, 1) - once, 1e-9))


def training_seconds(data: DataSplits, rates: StepRates, seconds_left: float) -> float:
    """Seconds of training steps that ``seconds_left`` holds at ``rates`` once evaluation is paid for
    (validation, one test pass): what a second spent before training takes from."""
    return epochs_affordable(data, rates, seconds_left) * len(data.splits["train"]) / rates.train


def steps_down(recipe: DictConfig, advise: Any) -> bool:
    """Whether a short budget can step ``recipe`` down: it trains every layer and a step-down is set."""
    return bool(advise.get("short_budget_freeze")) and str(recipe.freeze.name) == STEPS_DOWN_FROM


def short_budget_choice(
    recipe: DictConfig, data: DataSplits, rates: StepRates | None, seconds_left: float, advise: Any,
    batch_size: int = 64, accumulate: int = 1,
) -> dict[str, Any]:
    """The ``budget_strategy`` entry of ``advice.json``: the epochs the budget affords the recipe, and the
    freeze strategy that trains (``step_down``, None where the recipe's own does).

    Args:
        recipe: the advised recipe's config (its ``freeze`` and ``trainer.max_epochs``).
        data: the splits (their sizes set the cost of an epoch).
        rates: the chosen backbone's measured rates; may be None where :func:`steps_down` is False
            (nothing steps down, so nothing is estimated).
        seconds_left: what is left of the run's budget.
        advise: ``cfg.advise`` (``min_schedule_multiple``, ``min_full_steps``, ``short_budget_freeze``).
        batch_size: the run's ``data.batch_size``.
        accumulate: the run's ``trainer.accumulate_grad_batches``.
    """
    raw_multiple, freeze = advise.get("min_schedule_multiple"), advise.get("short_budget_freeze")
    multiple = None if raw_multiple is None else float(raw_multiple)
    if multiple is not None and not multiple >= 0.0:
        raise FineTuneError(f"advise.min_schedule_multiple must be 0 or more (null: steps alone), got {multiple:g}")
    probe_below = advise.get("linear_probe_below_steps")
    if probe_below is not None and int(probe_below) < 0:
        raise FineTuneError(f"advise.linear_probe_below_steps must be 0 or more (null: off), got {probe_below}")
    if freeze and str(freeze) not in STRATEGIES:
        raise FineTuneError(f"advise.short_budget_freeze: unknown freeze strategy '{freeze}'; choose one of "
                            f"{', '.join(STRATEGIES)} or null")
    min_steps, recipe_epochs, own = int(advise.min_full_steps), int(recipe.trainer.max_epochs), str(recipe.freeze.name)
    entry: dict[str, Any] = {
        "recipe_epochs": recipe_epochs, "recipe_freeze": own, "seconds_left": round(seconds_left, 1),
        "min_schedule_multiple": multiple, "min_full_steps": min_steps, "linear_probe_below_steps": probe_below,
        "step_down": None,
    }  # fmt: skip
    if not steps_down(recipe, advise):
        entry["reason"] = f"freeze={own} trains" + ("" if freeze else " (advise.short_budget_freeze=null)")
        return entry
    if rates is None:
        raise ValueError(f"{recipe.recipe} can step down: its estimate needs the measured rates")
    epochs = epochs_affordable(data, rates, seconds_left)
    steps = epochs * optimizer_steps(math.ceil(len(data.splits["train"]) / max(1, batch_size)), accumulate)
    entry.update(epochs_affordable=round(epochs, 1), steps_affordable=int(steps), images_per_s=rates.to_dict())
    afforded = (f"the budget affords about {epochs:.1f} of {recipe.recipe}'s {recipe_epochs} epochs, "
                f"{int(steps)} steps")
    if multiple is not None and epochs >= multiple * recipe_epochs:
        entry["reason"] = (f"{afforded} (>= advise.min_schedule_multiple={multiple:g} times the recipe's "
                           f"epochs): freeze={own} trains")
    elif steps >= min_steps:
        entry["reason"] = f"{afforded} (>= advise.min_full_steps={min_steps}): freeze={own} trains"
    else:
        probe = probe_below is not None and steps < int(probe_below)
        entry["step_down"] = LINEAR_PROBE if probe else str(freeze)
        of_epochs = "" if multiple is None else f"advise.min_schedule_multiple={multiple:g} times the epochs and < "
        entry["reason"] = (f"{afforded} (< {of_epochs}advise.min_full_steps={min_steps}): "
                           f"freeze={entry['step_down']} trains, not {own} "
                           + (f"(< advise.linear_probe_below_steps={probe_below}: too few steps to adapt any "
                              "layer from a random head)" if probe else "(advise.short_budget_freeze)"))
    return entry
