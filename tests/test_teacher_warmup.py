"""The teacher warm-up: random cells until the student has started to learn, then the teacher's choice,
and a warning wherever a run would silently train as random masking or lock in."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from aclip.modules.schedule import LearningRateSchedule
from aclip.modules.teacher_warmup import LOCK_IN_STEPS, SMOOTHING_STEPS, TeacherWarmup
from aclip.specs import SpecError
from aclip.summary.table import collect, markdown
from aclip.tasks import train
from tests.test_summarize import make_job
from tests.test_train import read_csv_metrics

PLATEAU = math.log(8)  # the CLIP loss of a model that cannot tell 8 captions apart


def handover(warmup: TeacherWarmup, losses: list[float], candidates: int = 8) -> int | None:
    """The step the teacher takes over when the student's CLIP losses are `losses`, step by step."""
    for step, loss in enumerate(losses):
        warmup.observe(step, loss, candidates)
    return warmup.handover_step


def test_a_fixed_warm_up_ends_at_its_step_whatever_the_loss():
    warmup = TeacherWarmup(min_steps=5)
    assert [warmup.teacher_active(step) for step in (0, 4, 5, 6)] == [False, False, True, True]
    assert handover(warmup, [PLATEAU] * 20) == 5
    assert TeacherWarmup().teacher_active(0)  # none at all: the published method


def test_an_adaptive_warm_up_lasts_until_the_running_loss_leaves_the_plateau():
    """The loss stays at ln(8) for 30 steps, then falls to half of it: the teacher takes over at the first
    step after the running average (over ~10 steps) is below 0.9 ln(8), not at the floor of 5 steps."""
    losses = [PLATEAU] * 30 + [PLATEAU / 2] * 30
    warmup = TeacherWarmup(min_steps=5, until_loss=0.9)
    step = handover(warmup, losses)
    running, alpha = PLATEAU, 1 / SMOOTHING_STEPS
    below = []
    for loss in losses:
        running = (1 - alpha) * running + alpha * loss
        below.append(running < 0.9 * PLATEAU)
    assert step == below.index(True) + 1 and 30 < step < 40
    assert not warmup.teacher_active(step - 1) and warmup.teacher_active(step)
    handover(warmup, [PLATEAU] * 10)  # a later rise of the loss does not undo the hand-over
    assert warmup.handover_step == step


def test_the_floor_and_the_ceiling_bound_the_adaptive_warm_up():
    assert handover(TeacherWarmup(min_steps=20, until_loss=0.9), [0.1] * 40) == 20  # learns at once
    assert handover(TeacherWarmup(min_steps=5, until_loss=0.9, max_steps=25), [PLATEAU] * 40) == 25
    assert handover(TeacherWarmup(min_steps=5, until_loss=0.9), [PLATEAU] * 40) is None  # no ceiling


def test_a_deciding_teacher_whose_student_stays_on_the_plateau_is_reported_once():
    warmup = TeacherWarmup()
    warnings = [warmup.observe(step, PLATEAU, 8) for step in range(LOCK_IN_STEPS * 2)]
    reported = [message for message in warnings if message]
    assert len(reported) == 1 and warnings.index(reported[0]) == LOCK_IN_STEPS - 1
    assert "locked in" in reported[0] and "model.teacher_warmup_until_loss=0.9" in reported[0]
    learning = TeacherWarmup()
    assert not any(learning.observe(step, 0.5, 8) for step in range(LOCK_IN_STEPS * 2))


def test_the_label_says_until_when_the_cells_are_random():
    assert TeacherWarmup(min_steps=30).label() == "warm-up: random cells until step 30"
    adaptive = TeacherWarmup(min_steps=30, until_loss=0.9, max_steps=500).label()
    assert adaptive == "warm-up: random cells until the student learns (from step 30, by step 500)"


def test_invalid_settings_and_crafted_states_are_refused():
    with pytest.raises(ValueError, match="teacher_warmup_until_loss must be null or a fraction"):
        TeacherWarmup(until_loss=1.5)
    with pytest.raises(ValueError, match="teacher_warmup_max_steps must be null or an integer >= "):
        TeacherWarmup(min_steps=10, until_loss=0.9, max_steps=5)
    warmup = TeacherWarmup(min_steps=5, until_loss=0.9)
    handover(warmup, [0.1] * 10)
    restored = TeacherWarmup(min_steps=5, until_loss=0.9)
    restored.load_state_dict(warmup.state_dict())
    assert (restored.handover_step, restored.running_loss) == (warmup.handover_step, warmup.running_loss)
    with pytest.raises(SpecError, match="not a loss and a step"):
        restored.load_state_dict({"running_loss": "${oc.env:HOME}", "handover_step": 3})


class HeldThenConstant(LearningRateSchedule):
    """A learning rate held near zero for `held_steps` optimizer steps, then the optimizer's own: a student
    that starts to learn late."""

    def __init__(self, held_steps: int = 10) -> None:
        self.held_steps = held_steps

    def lr_curve(self, base_lr: float, trainer) -> Callable[[int], float]:
        return lambda step: 1e-9 if step < self.held_steps else base_lr


ATTENTIVE = ["method=attentive_2x50", "evaluation.at_end=false", "evaluation.every_n_steps=null"]
# The tiny scale's model and batch, which leave the loss plateau of the built-in shapes within tens of
# steps (the tests' 32 px towers at batch 8 take hundreds).
TINY_SCALE = [
    "model.vision.image_size=64",
    "model.text.context_length=32",
    "model.embed_dim=64",
    "data.batch_size=128",
]


@pytest.mark.slow
def test_a_student_that_learns_late_keeps_random_cells_until_it_learns(train_config):
    """The learning rate held near zero for 20 steps: the loss stays on the plateau, the warm-up outlasts
    its floor of 3 steps, and the teacher takes over at the first step after the running loss is below
    0.9 ln(128), for good."""
    held = 20
    overrides = [*ATTENTIVE, *TINY_SCALE, "data.train.size=20480", "trainer.log_every_n_steps=1"]
    cfg = train_config(*overrides, "model.teacher_warmup_steps=3", "trainer.max_steps=130")
    OmegaConf.update(
        cfg, "model.scheduler", {"_target_": f"{__name__}.HeldThenConstant", "held_steps": held}, merge=False
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    step = json.loads((run / "timing.json").read_text())["teacher_handover_step"]
    rows = [row for row in read_csv_metrics(run) if row.get("train/clip_loss")]
    losses = [float(row["train/clip_loss"]) for row in rows]
    assert step is not None and held < step < len(rows), losses
    assert [float(row["train/teacher_active"]) for row in rows] == [0.0] * step + [1.0] * (len(rows) - step)
    running, alpha, bar = losses[0], 1 / SMOOTHING_STEPS, 0.9 * math.log(128)
    for loss in losses[1:step]:
        running = (1 - alpha) * running + alpha * loss
    assert running < bar  # it handed over when the running loss had left the plateau ...
    assert (running - alpha * losses[step - 1]) / (1 - alpha) >= bar  # ... and not a step before


def test_a_run_that_ends_inside_the_warm_up_says_so(train_config, caplog, tmp_path):
    cfg = train_config(*ATTENTIVE, "trainer.max_steps=3")  # the tiny scale's warm-up lasts 30 steps at least
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "the run's 3 optimizer steps end inside the teacher warm-up" in caplog.text
    assert "never chose the kept cells in this run's 3 optimizer steps" in caplog.text
    timing = json.loads((Path(cfg.paths.output_dir) / "timing.json").read_text())
    assert timing["teacher_handover_step"] is None

    sweep = tmp_path / "sweep"
    make_job(sweep, 0, ["masking=attentive_low", "trainer.max_steps=3"], 10.0)
    make_job(sweep, 1, ["masking=random", "trainer.max_steps=3"], 10.0)
    job = sweep / "0" / "timing.json"
    job.write_text(json.dumps({**json.loads(job.read_text()), "teacher_handover_step": None}))

    summary = markdown(collect(sweep))
    section = summary.split("## Jobs whose teacher never took over")[1]
    assert "job 0: masking=attentive_low" in section and "job 1" not in section


@pytest.mark.parametrize("waits", [True, False])
def test_the_self_supervised_terms_can_wait_for_the_warm_up(train_config, caplog, waits):
    """With `auxiliary_after_warmup`, A-CLIP's loss is the CLIP loss alone until the warm-up ends (here a
    fixed one of 2 steps), then CLIP + SimCLR + BYOL; without it, every term from the first step."""
    cfg = train_config(
        "method=aclip",
        "evaluation.at_end=false",
        "evaluation.every_n_steps=null",
        "trainer.log_every_n_steps=1",
        "trainer.max_steps=4",
        "model.teacher_warmup_steps=2",
        "model.teacher_warmup_until_loss=null",
        f"model.auxiliary_after_warmup={str(waits).lower()}",
    )
    train(cfg)
    rows = [row for row in read_csv_metrics(Path(cfg.paths.output_dir)) if row.get("train/clip_loss")]
    assert len(rows) == 4
    for step, row in enumerate(rows):
        terms = [float(row[f"train/{name}_loss"]) for name in ("clip", "simclr", "byol")]
        joined = not waits or step >= 2
        expected = sum(terms) if joined else terms[0]
        assert float(row["train/loss"]) == pytest.approx(expected, rel=1e-5), (step, row)
        assert terms[1] > 0.1  # the waiting terms are still computed and logged
        if waits:
            assert float(row["train/auxiliary_active"]) == float(joined)
        else:
            assert "train/auxiliary_active" not in row or not row["train/auxiliary_active"]


def test_terms_that_never_joined_are_reported(train_config, caplog):
    cfg = train_config(*ATTENTIVE, "method=aclip", "trainer.max_steps=3", "model.auxiliary_after_warmup=true")
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "the self-supervised terms never joined the loss in this run's 3 optimizer steps" in caplog.text


@pytest.mark.parametrize(("masking", "reported"), [("attentive_low", True), ("random", False)])
def test_a_lock_in_is_reported_only_where_the_teacher_chooses(
    train_config, caplog, monkeypatch, masking, reported
):
    """A student on the plateau a few steps after the hand-over: with an attentive policy, its teacher may
    hide what the captions name (reported); with random cells and self-supervised terms that wait for the
    same warm-up, there is no teacher to blame (silent)."""
    monkeypatch.setattr("aclip.modules.teacher_warmup.LOCK_IN_STEPS", 3)
    cfg = train_config(
        "method=aclip",
        f"masking={masking}",
        "evaluation.at_end=false",
        "evaluation.every_n_steps=null",
        "trainer.max_steps=5",
        "model.teacher_warmup_steps=1",
        "model.teacher_warmup_until_loss=null",
        "model.auxiliary_after_warmup=true",
    )
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert ("likely locked in" in caplog.text) == reported, caplog.text
