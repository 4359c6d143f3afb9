"""Training compute: each phase's FLOPs per optimizer step, counted before training, and the budget.

The count: one training batch of the run's shapes through the module's `forward_step` and its backward
pass, under torch's FLOP counter, on fake tensors (`FakeTensorMode`: shapes and dtypes, no memory and no
arithmetic) and a fake copy of the module, once per phase; nothing of the run is computed or changed. The
batch is one sample that the datamodule prepares from a blank image (its views, teacher crop, boxes and
caption tokens, as every sample of the run has them), repeated to the per-device batch. A policy's FLOPs
depend on how many tokens it keeps, not which, while its choice may need real values (blockwise masking
loops until its budget is met): the count keeps the first cells of the policy's budget instead
(`_SameBudget`).

What torch's counter counts: matrix products, convolutions and attention (element-wise operations count
zero), i.e. both towers on the kept tokens, the EMA teacher's pass, the heads and the losses' similarity
matrices, forward and backward. Not counted: the optimizer step, a policy's own choice (cluster masking's
pixel similarities), and gradient-checkpointing recomputation (these are model FLOPs: a budget buys the
same training with and without it). The count is made before the processes of a multi-device run join, so
each rank's contrastive loss is counted against its own batch, not the gathered one (B_local x
(B_global - B_local) x embed_dim multiply-adds per loss and direction fewer, beside the towers' cost
negligible); a run's FLOPs per optimizer step are the count x devices x gradient-accumulation steps.

The budget (`budget` in conf/train.yaml): `budget.flops` sets trainer.max_steps to the most optimizer
steps whose FLOPs fit in it, the phases laid out over those steps, so that the learning-rate schedule
ends with the budget and every job of a sweep stops within one optimizer step of it; `budget.seconds` is
Lightning's `max_time` (the schedule keeps the configured length).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

from aclip.callbacks.resume import collect_random_states, restore_random_states
from aclip.datamodules.datamodule import ClipDataModule
from aclip.distributed import per_device_batch_size, world_size
from aclip.errors import ConfigError
from aclip.flop_counter import flop_counter
from aclip.modules.aclip import AClip
from aclip.modules.masking import TokenMasking
from aclip.modules.stages import Phase, flops_until, phase_ends

log = logging.getLogger(__name__)


class _SameBudget(TokenMasking):
    """`policy`'s views, teacher scores and budget, keeping the first cells of that budget: what stands in
    for a policy when a step's FLOPs are counted on fake tensors (not registered: never a description)."""

    def __init__(self, policy: TokenMasking) -> None:
        self.policy, self.unit = policy, policy.unit
        self.needs_scores, self.layers = policy.needs_scores, policy.layers

    def view_size(self, size: int, patch_size: int) -> int:
        return self.policy.view_size(size, patch_size)

    def num_kept_cells(self, cells: tuple[int, int]) -> int:
        return self.policy.num_kept_cells(cells)

    def select_cells(self, scores, cells, batch, device, generator):
        return torch.arange(self.num_kept_cells(cells), device=device).expand(batch, -1)


def example_sample(datamodule: ClipDataModule, teacher_crop: bool) -> dict[str, Tensor]:
    """One training sample as `datamodule` prepares them (its views, teacher crop when `teacher_crop`,
    boxes and caption tokens), from a blank image; the random states are left as they were."""
    states = collect_random_states()
    transform = datamodule.view_transform
    crop, transform.teacher_crop = transform.teacher_crop, teacher_crop
    try:
        side = transform.image_size
        return datamodule.prepare_pair(torch.zeros(3, side, side, dtype=torch.uint8), "a photo")
    finally:
        transform.teacher_crop = crop
        restore_random_states(states)


def _start_autograd_engine() -> None:
    """Run one backward pass on real tensors. The autograd engine decides at its first backward how many
    device threads to start; a first backward on fake tensors starts threads for devices that a CPU
    machine does not have, and no process forked afterwards (Lightning's `ddp_fork` and
    `ddp_notebook` ranks) could then run a backward pass."""
    torch.ones((), requires_grad=True).backward()


def count_batch_flops(module: AClip, sample: Mapping[str, Tensor], batch_size: int) -> list[int]:
    """The FLOPs of one training batch of `batch_size` copies of `sample` on one device (forward and
    backward) in each of `module`'s phases, counted on fake tensors (see the module)."""
    _start_autograd_engine()
    fake_mode = FakeTensorMode()
    with FakeCopyMode(fake_mode):
        counting = copy.deepcopy(module, memo={id(module.tokenizer): module.tokenizer})
    counting.model.vision.set_grad_checkpointing(False)
    counting.model.text.set_grad_checkpointing(False)
    counting.train()
    flops = []
    with fake_mode:
        batch = {
            key: torch.empty((batch_size, *value.shape), dtype=value.dtype) for key, value in sample.items()
        }
        for phase in counting.phases:
            with flop_counter() as counter:
                step = counting.forward_step(batch, phase, _SameBudget(phase.masking), None)
                step["loss"].backward()
            flops.append(counter.get_total_flops())
            counting.zero_grad(set_to_none=True)
    return flops


def steps_within(budget: float, phases: Sequence[Phase], step_flops: Sequence[int]) -> int:
    """A number of optimizer steps whose FLOPs (each phase's `step_flops`, the phases laid out over those
    steps) fit in `budget` while one step more would not: the run stops within one step of the budget. A
    `ConfigError` when not even the phases of fixed length fit."""

    def spent(steps: int) -> int:
        return flops_until(phase_ends(phases, steps), step_flops, steps)

    # The shortest run from which on every length leaves the phases of fixed length room (the phases of
    # fractions take at most their share rounded half up).
    fixed = sum(phase.steps or 0 for phase in phases)
    fractions = sum(phase.fraction or 0.0 for phase in phases)
    low = max(1, math.ceil((fixed + 0.5) / (1 - fractions)) if fractions else fixed)
    if spent(low) > budget:
        raise ConfigError(
            f"budget.flops={budget:.4g} buys fewer than the {low} optimizer steps the phases need "
            f"({spent(low):.4g} FLOPs): raise the budget or shorten the phases"
        )
    high = 2 * low
    while spent(high) <= budget:
        low, high = high, 2 * high
    while high - low > 1:  # spent(low) <= budget < spent(high)
        middle = (low + high) // 2
        low, high = (middle, high) if spent(middle) <= budget else (low, middle)
    # One more step may move a step of each of several phases of fractions to the next phase: the count
    # need not grow with every step. Settle on a length whose next step would overspend.
    while spent(low + 1) <= budget:
        low += 1
    return low


@dataclass(frozen=True)
class ComputePlan:
    """A run's FLOPs: each phase's per batch on one device (`batch_flops`), the devices x micro-batches of
    an optimizer step, and the trainer's limits that the budget sets (none without a budget)."""

    batch_flops: list[int]
    batches_per_step: int
    budget_flops: float | None = None
    budget_seconds: float | None = None
    max_steps: int | None = None

    @property
    def step_flops(self) -> list[int]:
        """Each phase's FLOPs per optimizer step, all devices and micro-batches."""
        return [flops * self.batches_per_step for flops in self.batch_flops]

    def trainer_limits(self) -> dict[str, Any]:
        """The Trainer's arguments that end the run with its budget."""
        limits: dict[str, Any] = {}
        if self.max_steps is not None:
            # Epochs no bound before the steps (an epoch takes at least one step), but a finite number:
            # Lightning then measures an epoch before training, which a warm-up in epochs needs.
            limits |= {"max_steps": self.max_steps, "max_epochs": self.max_steps}
        if self.budget_seconds is not None:
            limits["max_time"] = {"seconds": self.budget_seconds}
        return limits

    def record(self, module: AClip, steps: int, num_views: int) -> dict[str, Any]:
        """For timing.json: the FLOPs of the run's first `steps` optimizer steps (`training_flops`) and of
        an optimizer step in each phase, the budget, and, for a run of several phases (of the batch's
        `num_views` views), each phase's steps, tokens per view and views, and their means over the
        steps (`kept_tokens`, `num_views`)."""
        ends = module.phase_ends
        record: dict[str, Any] = {
            "training_flops": flops_until(ends, self.step_flops, steps),
            "flops_per_step": self.step_flops if len(self.step_flops) > 1 else self.step_flops[0],
            "budget_flops": self.budget_flops,
            "budget_seconds": self.budget_seconds,
        }
        if len(module.phases) > 1 and ends is not None:
            phases = [
                {
                    "steps": max(0, min(steps, end) - start),
                    "kept_tokens": module.kept_tokens(phase),
                    "num_views": phase.views or num_views,
                    "flops_per_step": flops,
                    "masking": repr(phase.masking),
                }
                for phase, start, end, flops in zip(
                    module.phases, [0, *ends[:-1]], ends, self.step_flops, strict=True
                )
            ]
            trained = max(1, sum(phase["steps"] for phase in phases))
            for key in ("kept_tokens", "num_views"):
                record[key] = sum(phase["steps"] * phase[key] for phase in phases) / trained
            record["phases"] = phases
        return record


def plan_compute(cfg: DictConfig, module: AClip, datamodule: ClipDataModule) -> ComputePlan:
    """Count each phase's FLOPs per optimizer step of the configured run (on fake tensors) and turn
    `budget.flops` into its length; hands the counts to `module` (`train/flops`, the throughput's MFU)."""
    budget = cfg.get("budget") or {}
    flops_budget, seconds = budget.get("flops"), budget.get("seconds")
    world = world_size(cfg.trainer)
    batch_size = per_device_batch_size(cfg.data.batch_size, world)
    sample = example_sample(datamodule, module.needs_teacher_crop)
    batch_flops = count_batch_flops(module, sample, batch_size)
    module.phase_batch_flops = batch_flops
    plan = ComputePlan(
        batch_flops,
        world * cfg.trainer.get("accumulate_grad_batches", 1),
        flops_budget,
        seconds,
    )
    if flops_budget is not None:
        steps = steps_within(flops_budget, module.phases, plan.step_flops)
        plan = ComputePlan(plan.batch_flops, plan.batches_per_step, flops_budget, seconds, steps)
        log.info(
            "budget.flops=%.4g: %d optimizer steps of %s FLOPs each (%s)",
            flops_budget,
            steps,
            " / ".join(f"{flops:.4g}" for flops in plan.step_flops),
            "per phase" if len(plan.step_flops) > 1 else "one phase",
        )
    return plan
