"""When the EMA teacher starts choosing the patches: the teacher warm-up of a policy it scores.

An attentive policy keeps the cells its EMA teacher attends to. At the start of a run that teacher is an
untrained network, which keeps or avoids the captioned object by the luck of its initialisation; when it
avoids it, the student never sees what the captions name, its EMA never improves, and the run can lock
in at the loss of a model that cannot tell the batch's captions apart, ln(global batch)
(docs/attentive_stability.md). During the warm-up the policy keeps random cells of the same budget
instead. It ends after `min_steps` optimizer steps; with `until_loss`, only once the student has started
to learn as well, i.e. once its running CLIP loss is below `until_loss` x ln(global batch), a label-free
signal, and at the latest after `max_steps`. With `min_steps` 0 and no `until_loss` there is no warm-up:
the published method, whose teacher decides from the first step.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from aclip.specs import SpecError, is_integer, is_number

# The running CLIP loss is an exponential moving average of the per-step loss over about this many steps.
SMOOTHING_STEPS = 10
# After this many optimizer steps of a deciding teacher whose student's loss is still on the plateau, a
# lock-in is likely and is reported (once).
LOCK_IN_STEPS = 200
# Where the plateau ends for the lock-in report when the warm-up has no `until_loss` of its own.
DEFAULT_PLATEAU_FRACTION = 0.9


class TeacherWarmup:
    """Decides, step by step, whether the teacher chooses the kept cells (`teacher_active`).

    `observe(step, clip_loss, candidates)` takes every training batch's CLIP loss (the mean over views, of
    the global batch: every rank decides alike) and the number of captions each image is told apart from.
    An adaptive warm-up (`until_loss`) hands over from the next optimizer step once its conditions hold,
    and keeps the decision from then on: a later rise of the loss does not undo it. The running loss stays
    on the loss's device; it is read on the host (a device synchronisation) only while an adaptive
    warm-up waits for it, and once for the lock-in check.
    """

    def __init__(
        self, min_steps: int = 0, until_loss: float | None = None, max_steps: int | None = None
    ) -> None:
        if not is_integer(min_steps) or min_steps < 0:
            raise ValueError(f"teacher_warmup_steps must be an integer >= 0, got {min_steps!r}")
        if until_loss is not None and (not is_number(until_loss) or not 0 < until_loss < 1):
            raise ValueError(
                "teacher_warmup_until_loss must be null or a fraction of ln(batch) in (0, 1), got "
                f"{until_loss!r}"
            )
        if max_steps is not None and (not is_integer(max_steps) or max_steps < min_steps):
            raise ValueError(
                f"teacher_warmup_max_steps must be null or an integer >= teacher_warmup_steps={min_steps}, "
                f"got {max_steps!r}"
            )
        self.min_steps, self.until_loss, self.max_steps = min_steps, until_loss, max_steps
        self.running_loss: Tensor | float | None = None
        # The first optimizer step the teacher decides; None while an adaptive warm-up has not ended.
        self.handover_step: int | None = min_steps if until_loss is None else None
        self._lock_in_reported = False

    def teacher_active(self, step: int) -> bool:
        """Whether the teacher chooses the kept cells at optimizer step `step`."""
        return self.handover_step is not None and step >= self.handover_step

    def plateau(self, candidates: int) -> float:
        """The running loss below which the student has left the plateau: a fraction of ln(candidates)."""
        return (self.until_loss or DEFAULT_PLATEAU_FRACTION) * math.log(candidates)

    def observe(self, step: int, clip_loss: Tensor | float, candidates: int) -> str | None:
        """Take the CLIP loss of a training batch of optimizer step `step`. Returns a warning to report
        when a deciding teacher's student still sits on the plateau `LOCK_IN_STEPS` steps after the
        hand-over."""
        if isinstance(clip_loss, Tensor):
            clip_loss = clip_loss.detach()
        alpha, previous = 1 / SMOOTHING_STEPS, self.running_loss
        self.running_loss = clip_loss if previous is None else (1 - alpha) * previous + alpha * clip_loss
        if self.handover_step is None:
            if step + 1 >= self.min_steps:
                ceiling = self.max_steps is not None and step + 1 >= self.max_steps
                if ceiling or self._learning(candidates):
                    self.handover_step = step + 1
            return None
        if step + 1 - self.handover_step != LOCK_IN_STEPS or self._lock_in_reported:
            return None
        self._lock_in_reported = True
        if self._learning(candidates):
            return None
        return (
            f"the EMA teacher has chosen the kept cells for {LOCK_IN_STEPS} optimizer steps and the running "
            f"CLIP loss is still {float(self.running_loss):.3f}, above {self.plateau(candidates):.3f} "
            f"({self.until_loss or DEFAULT_PLATEAU_FRACTION} x ln {candidates}): the student is likely "
            "locked in on views that miss what the captions name (docs/attentive_stability.md). A warm-up "
            "that lasts until the student learns avoids it: model.teacher_warmup_until_loss=0.9"
        )

    def _learning(self, candidates: int) -> bool:
        """Whether the running loss has left the plateau."""
        return float(self.running_loss) < self.plateau(candidates)

    def label(self) -> str:
        """What the warm-up does, for a picture's title: random cells, and until when."""
        if self.until_loss is None:
            return f"warm-up: random cells until step {self.min_steps}"
        bounds = f"from step {self.min_steps}" + (f", by step {self.max_steps}" if self.max_steps else "")
        return f"warm-up: random cells until the student learns ({bounds})"

    def inside_warmup(self, total_steps: int) -> str | None:
        """A warning when a run of `total_steps` optimizer steps ends before the warm-up can: the teacher
        never decides, and the run trains as random masking of the same budget."""
        if self.min_steps < total_steps:
            return None
        return (
            f"the run's {total_steps} optimizer steps end inside the teacher warm-up "
            f"(model.teacher_warmup_steps={self.min_steps}): the EMA teacher never chooses the kept cells, "
            "and the run trains with random cells of the same budget, as random masking does. Train longer "
            "or lower model.teacher_warmup_steps"
        )

    def never_handed_over(self, last_step: int) -> str | None:
        """A warning, at the end of training, when the teacher never chose the kept cells."""
        if self.handover_step is not None and self.handover_step < last_step:
            return None
        if last_step <= self.min_steps:
            why = f"the run ended within the warm-up's first {self.min_steps} steps"
        else:
            running = "none" if self.running_loss is None else f"{float(self.running_loss):.3f}"
            why = f"the student's running CLIP loss ({running}) never left the plateau"
        return (
            f"the EMA teacher never chose the kept cells in this run's {last_step} optimizer steps: {why}, "
            "so the run trained with random cells of the same budget, as random masking does "
            f"(model.teacher_warmup_steps={self.min_steps}, teacher_warmup_until_loss={self.until_loss})"
        )

    def state_dict(self) -> dict[str, Any]:
        running = None if self.running_loss is None else float(self.running_loss)
        return {"running_loss": running, "handover_step": self.handover_step}

    def load_state_dict(self, state: Any) -> None:
        """Restore `state_dict()`'s values (`check_state`). A fixed warm-up keeps the hand-over step its
        configuration gives."""
        running, handover = check_state(state)
        self.running_loss = running
        if self.until_loss is not None:
            self.handover_step = handover


def check_state(state: Any) -> tuple[float | None, int | None]:
    """The running loss and hand-over step of a checkpoint's warm-up state, checked to be a number and an
    integer (or None): a checkpoint is data (`SpecError` otherwise)."""
    if not isinstance(state, dict):
        raise SpecError(f"the teacher warm-up state must be a mapping, got {type(state).__name__}")
    running, handover = state.get("running_loss"), state.get("handover_step")
    if not (running is None or is_number(running)) or not (handover is None or is_integer(handover)):
        raise SpecError(f"the teacher warm-up state holds {state!r}, not a loss and a step")
    return running, handover
