"""Where a training step's time goes: its phases, forward and backward, from one torch.profiler trace.

The phases are the step's own methods and modules (`AClip.ema_pass`, `map_scores_to_views` and the
masking policy, the online vision tower, `encode_text`, the CLIP loss, the SSL heads and losses, the
`EMAUpdate` callback), each wrapped in a `record_function` range for the profiled steps only. A forward
op belongs to the innermost phase around it; a backward op (`autograd::engine::evaluate_function: ...`)
to the phase of the forward op that created its autograd node (same sequence number); ops inside
`Optimizer.step` but in no phase are the optimizer. Times are CPU times of the outermost ops on the CPU,
and the device time of the kernels they launched on CUDA; whatever the profiled wall time holds beyond
them (Python, Lightning, an idle GPU) is "other". It describes eager execution: a tower compiled with
`model.compile=true` bypasses the wrapped `forward`, and its time lands in "other".
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import aclip.modules.aclip as aclip_module
from aclip.modules.aclip import AClip
from benchmarks.timing import RunSettings, StepTimer, fit, synchronize
from benchmarks.variants import Variant, repeated_loader, to_device

PREFIX = "phase/"
EMA_SCORING = "EMA scoring"
MASKING = "score mapping + masking"
VIEW_RESIZE = "view resize"
ONLINE_VISION = "online vision"
TEXT = "text"
CLIP_LOSS = "CLIP loss"
SSL = "SSL heads + losses"
STEP_REST = "rest of training_step (logging, glue)"
OPTIMIZER = "optimizer"
EMA_UPDATE = "EMA update"
OTHER = "other (Python, Lightning, idle)"
ORDER = (EMA_SCORING, MASKING, VIEW_RESIZE, ONLINE_VISION, TEXT, CLIP_LOSS, SSL, STEP_REST, OPTIMIZER,
         EMA_UPDATE, OTHER)  # fmt: skip
BACKWARD = "autograd::engine::evaluate_function"


def _ranged(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + name):
            return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def phase_ranges(module: AClip, ema_callback: Callback) -> Iterator[None]:
    """Wrap the step's phases in profiler ranges (instance attributes shadowing the methods); undo after."""
    targets = [
        (module, "training_step", STEP_REST),
        (module, "ema_pass", EMA_SCORING),
        (module, "mask_generator", MASKING),
        (module.masking, "select", MASKING),
        (module.masking, "prepare_views", VIEW_RESIZE),
        (module.model.vision, "forward", ONLINE_VISION),
        (module.model, "encode_text", TEXT),
        (module.clip_loss, "forward", CLIP_LOSS),
        (module.self_supervision, "forward", SSL),
        (ema_callback, "on_train_batch_end", EMA_UPDATE),
    ]
    original_map = aclip_module.map_scores_to_views
    for owner, attribute, name in targets:
        setattr(owner, attribute, _ranged(name, getattr(owner, attribute)))
    aclip_module.map_scores_to_views = _ranged(MASKING, original_map)
    try:
        yield
    finally:
        aclip_module.map_scores_to_views = original_map
        for owner, attribute, _ in targets:
            delattr(owner, attribute)  # the class's method shows through again


class _Profiler(Callback):
    """Profiles the optimizer steps after `warmup` (from the end of step `warmup` to the last one)."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup = warmup
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        self.profiler = profile(activities=activities)
        self.wall = 0.0
        self._started = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        if trainer.global_step == self.warmup:
            self.profiler.start()
            self._started = time.perf_counter()
        elif trainer.global_step == trainer.max_steps:
            self.wall = time.perf_counter() - self._started
            self.profiler.stop()


@dataclass
class Breakdown:
    """Seconds per step by phase, forward and backward, and the profiled wall time per step."""

    forward: dict[str, float]
    backward: dict[str, float]
    wall: float

    def total(self, phase: str) -> float:
        return self.forward.get(phase, 0.0) + self.backward.get(phase, 0.0)

    def phases(self) -> list[str]:
        return [phase for phase in ORDER if self.total(phase) > 0]


def _is_op(event: Any) -> bool:
    return "::" in event.name and not event.name.startswith(PREFIX)


def _phase(event: Any) -> str:
    """The innermost phase range around `event`, else the optimizer if inside its step, else other."""
    in_optimizer = False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(PREFIX):
            return parent.name[len(PREFIX) :]
        in_optimizer |= parent.name.startswith("Optimizer.")
        parent = parent.cpu_parent
    return OPTIMIZER if in_optimizer else OTHER


def _has_op_ancestor(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_op(parent):
            return True
        parent = parent.cpu_parent
    return False


def attribute(events: Sequence[Any], device_time: bool, steps: int, wall: float) -> Breakdown:
    """Split the profiled ops' time over the phases (see the module docstring); per step."""
    creator = {
        event.sequence_nr: _phase(event)
        for event in events
        if event.sequence_nr >= 0 and _is_op(event) and not event.name.startswith(BACKWARD)
    }
    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    for event in events:
        if not _is_op(event) or _has_op_ancestor(event):
            continue
        seconds = (event.device_time_total if device_time else event.cpu_time_total) / 1e6 / steps
        if event.name.startswith(BACKWARD):
            backward[creator.get(event.sequence_nr, OTHER)] += seconds
        else:
            forward[_phase(event)] += seconds
    wall /= steps
    forward[OTHER] += max(0.0, wall - sum(forward.values()) - sum(backward.values()))
    return Breakdown(dict(forward), dict(backward), wall)


def profile_variant(variant: Variant, settings: RunSettings) -> Breakdown:
    """Profile `settings.steps` optimizer steps of `variant` (after the warm-up); split them by phase."""
    cuda = settings.device.type == "cuda"
    profiler = _Profiler(settings.warmup, cuda)
    timer = StepTimer(settings.warmup)  # keeps the synchronisation points of the timed runs
    loader = repeated_loader(to_device(variant.batch, settings.device), settings.warmup + settings.steps)
    ema_callback = instantiate(variant.cfg.callbacks.ema)
    with phase_ranges(variant.module, ema_callback):
        fit(variant.module, variant.cfg, loader, settings, [profiler, timer], ema_callback=ema_callback)
    return attribute(profiler.profiler.events(), cuda, settings.steps, profiler.wall)


def format_breakdown(breakdown: Breakdown) -> str:
    """A markdown table: per phase, forward, backward and total ms per step and the share of the step."""
    lines = [
        "| phase | forward ms | backward ms | total ms | share of step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for phase in breakdown.phases():
        total = breakdown.total(phase)
        lines.append(
            f"| {phase} | {breakdown.forward.get(phase, 0) * 1e3:.1f} | "
            f"{breakdown.backward.get(phase, 0) * 1e3:.1f} | {total * 1e3:.1f} | "
            f"{100 * total / breakdown.wall:.1f} % |"
        )
    lines.append(f"| step (profiled wall time) | | | {breakdown.wall * 1e3:.1f} | 100 % |")
    return "\n".join(lines)
