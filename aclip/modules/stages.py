"""Phases of one run: the masking the online encoder trains with at each optimizer step.

A run is one phase unless `model.phases` lists several (the `stages` config group writes it), each a
mapping of:

- its length: `steps` (optimizer steps) or `fraction` (of the run's optimizer steps); exactly one phase
  gives neither and lasts the rest of the run. The fractions are laid out in order and rounded where they
  end (half up): two phases of 0.3 in a run of 5 steps end at steps 2 (1.5 rounded up) and 3 (3.0),
  and the fractions' phases together never take more than the run;
- `masking`: the policy (`_target_` and its arguments, as in conf/masking/*.yaml); absent or null: the
  run's own `masking`;
- `keep_ratio`: the policy's keep ratio replaced (its other arguments kept);
- `views`: how many of the batch's views the phase trains on, the first ones (null: all).

The phases are part of the model's description (a checkpoint's hyper-parameters), so each policy is built
from the registry of `aclip.modules.masking` (`build_policy`), never by importing what a description
names. Which phase is in force is a function of the optimizer step and the run's length alone, so a
resumed run continues in the phase it stopped in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aclip.modules.masking import RandomMasking, TokenMasking, build_policy
from aclip.specs import SpecError, is_integer, is_number

PHASE_KEYS = ("steps", "fraction", "masking", "keep_ratio", "views")


@dataclass(frozen=True)
class Phase:
    """One phase: its policy, its length (`steps`, or `fraction` of the run; neither: the rest) and the
    number of views it trains on (None: all)."""

    masking: TokenMasking
    steps: int | None = None
    fraction: float | None = None
    views: int | None = None

    @property
    def warmup_masking(self) -> TokenMasking | None:
        """What the phase keeps while the teacher warm-up lasts, for a policy the teacher scores: random
        cells of its budget (`aclip.modules.teacher_warmup`); None for other policies."""
        if not self.masking.needs_scores:
            return None
        return RandomMasking(keep_ratio=self.masking.keep_ratio, unit=self.masking.unit)

    def describe(self) -> str:
        """The phase in words, e.g. `0.1 of the steps: NoMasking(...), 1 view`."""
        if self.steps is not None:
            length = f"{self.steps} steps"
        elif self.fraction is not None:
            length = f"{self.fraction:g} of the steps"
        else:
            length = "the rest"
        views = "all views" if self.views is None else f"{self.views} view" + "s" * (self.views > 1)
        return f"{length}: {self.masking!r}, {views}"


def build_phases(
    phases: Sequence[Mapping[str, Any]] | None,
    masking: Mapping[str, Any] | None,
    run_policy: TokenMasking | None = None,
) -> list[Phase]:
    """The phases a description lists (None or empty: one phase of `masking`, the run's policy), each
    checked; a `SpecError` naming the key (`phases[1].keep_ratio`) of anything that cannot work. A phase
    of the run's policy unchanged shares `run_policy` (default: built from `masking`)."""
    run_policy = build_policy(masking) if run_policy is None else run_policy
    if not phases:
        return [Phase(run_policy)]
    if isinstance(phases, str | Mapping) or not isinstance(phases, Sequence):
        raise SpecError(f"phases must be a list of phases, got {type(phases).__name__}")
    built = [
        _build_phase(phase, masking, run_policy, f"phases[{index}]") for index, phase in enumerate(phases)
    ]
    rest = [index for index, phase in enumerate(built) if phase.steps is None and phase.fraction is None]
    if len(rest) != 1:
        found = f"phases {rest} give neither" if rest else "every phase gives one"
        raise SpecError(
            f"phases: exactly one phase must give neither steps nor fraction (it lasts the rest of the "
            f"run): {found}"
        )
    fractions = sum(phase.fraction or 0.0 for phase in built)
    if fractions > 1 or (fractions == 1 and any(phase.steps for phase in built)):
        raise SpecError(
            f"phases: the fractions add up to {fractions:g}, which leaves no steps for the other phases; "
            "lower them"
        )
    return built


def _build_phase(
    phase: Any, run_masking: Mapping[str, Any] | None, run_policy: TokenMasking, key: str
) -> Phase:
    if not isinstance(phase, Mapping):
        raise SpecError(f"{key} must be a mapping of {', '.join(PHASE_KEYS)}, got {type(phase).__name__}")
    unknown = sorted(set(phase) - set(PHASE_KEYS))
    if unknown:
        raise SpecError(f"{key} has the keys {unknown}; a phase takes {', '.join(PHASE_KEYS)}")
    steps, fraction, views = phase.get("steps"), phase.get("fraction"), phase.get("views")
    if steps is not None and fraction is not None:
        raise SpecError(f"{key} gives both steps={steps} and fraction={fraction}: give one")
    if steps is not None and (not is_integer(steps) or steps < 0):
        raise SpecError(f"{key}.steps must be an integer >= 0, got {steps!r}")
    if fraction is not None and (not is_number(fraction) or not 0 <= fraction <= 1):
        raise SpecError(f"{key}.fraction must be a number in [0, 1], got {fraction!r}")
    if views is not None and (not is_integer(views) or views < 1):
        raise SpecError(f"{key}.views must be null (all) or an integer >= 1, got {views!r}")
    spec, keep_ratio = phase.get("masking"), phase.get("keep_ratio")
    if spec is None and keep_ratio is None:
        return Phase(run_policy, steps, None if fraction is None else float(fraction), views)
    spec = dict(run_masking or {}) if spec is None else spec
    if not isinstance(spec, Mapping):
        raise SpecError(f"{key}.masking must be a mapping with a `_target_`, got {type(spec).__name__}")
    if keep_ratio is not None:
        spec = {**spec, "keep_ratio": keep_ratio}
    try:
        policy = build_policy(spec)
    except SpecError as error:
        raise SpecError(f"{key}.masking: {error}") from None
    except (TypeError, ValueError) as error:  # the policy's own check of its arguments
        raise SpecError(f"{key}.masking ({spec.get('_target_')}): {error}") from None
    return Phase(policy, steps, None if fraction is None else float(fraction), views)


def phase_ends(phases: Sequence[Phase], total_steps: int) -> list[int]:
    """The optimizer step at which each phase ends (exclusive) in a run of `total_steps`; a ValueError
    when the phases of fixed length do not fit."""
    lengths: list[int | None] = []
    fraction, boundary = 0.0, 0  # the fractions so far, and the step where they end
    for phase in phases:
        if phase.fraction is not None:
            fraction += phase.fraction
            previous, boundary = boundary, min(total_steps, math.floor(fraction * total_steps + 0.5))
            lengths.append(boundary - previous)
        else:
            lengths.append(phase.steps)
    fixed = sum(length for length in lengths if length is not None)
    if fixed > total_steps:
        raise ValueError(
            f"the phases' lengths ({'; '.join(phase.describe() for phase in phases)}) add up to {fixed} "
            f"optimizer steps, more than the run's {total_steps}: shorten them or train longer"
        )
    ends, step = [], 0
    for length in lengths:
        step += total_steps - fixed if length is None else length
        ends.append(step)
    return ends


def phase_at(ends: Sequence[int], step: int) -> int:
    """The index of the phase in force at optimizer step `step` (the last one past the run's end)."""
    return next((index for index, end in enumerate(ends) if step < end), len(ends) - 1)


def flops_until(ends: Sequence[int] | None, step_flops: Sequence[int], step: int) -> int:
    """The FLOPs of a run's first `step` optimizer steps, from each phase's FLOPs per step and where the
    phases end (`phase_ends`; None: one phase)."""
    ends = [step] if ends is None else [*ends[:-1], max(ends[-1], step)]  # the last phase lasts on
    total, start = 0, 0
    for end, flops in zip(ends, step_flops, strict=True):
        total += max(0, min(step, end) - start) * flops
        start = end
    return total
