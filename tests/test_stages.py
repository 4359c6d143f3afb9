"""Phases within one run (`stages`): their lengths, their checks, and what each trains with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import open_dict

from aclip.compute import plan_compute
from aclip.config import validate_config
from aclip.errors import ConfigError
from aclip.modules.aclip import AClip
from aclip.modules.masking import AttentiveLow, NoMasking, RandomMasking
from aclip.modules.stages import build_phases, flops_until, phase_at, phase_ends
from aclip.specs import SpecError
from aclip.tasks import train
from tests.helpers import callback_overrides
from tests.test_resume import RUN, assert_same_tensors, final_state, helper
from tests.test_train import read_csv_metrics

RANDOM = {"_target_": "aclip.modules.masking.RandomMasking", "keep_ratio": 0.5}
NONE = {"_target_": "aclip.modules.masking.NoMasking"}


def test_phases_of_steps_fractions_and_the_rest_tile_the_run():
    phases = build_phases(
        [
            {"steps": 3},
            {"fraction": 0.3, "masking": NONE, "views": 1},
            {"keep_ratio": 0.25},
            {"fraction": 0.3},
        ],
        RANDOM,
    )
    # The fractions end where their running sum, rounded half up, ends: 0.3 x 10 = 3, 0.6 x 10 = 6.
    assert phase_ends(phases, 10) == [3, 6, 7, 10]
    assert phase_ends(phases, 7) == [3, 5, 5, 7]  # 2.1 and 4.2 round to 2 and 4: nothing left to the rest
    assert [phase_at([3, 6, 7, 10], step) for step in (0, 2, 3, 6, 7, 9, 12)] == [0, 0, 1, 2, 3, 3, 3]
    assert isinstance(phases[1].masking, NoMasking) and phases[1].views == 1
    assert isinstance(phases[2].masking, RandomMasking) and phases[2].masking.keep_ratio == 0.25
    assert phases[0].masking.keep_ratio == 0.5  # the run's own policy
    with pytest.raises(ValueError, match="add up to 4 optimizer steps, more than the run's 2: shorten"):
        phase_ends(phases, 2)
    # FLOPs per step of each phase, summed over the steps taken; the last phase lasts past the run's end.
    assert flops_until([3, 6, 7, 10], [1, 10, 100, 1000], 8) == 3 + 30 + 100 + 1000
    assert flops_until([2, 4], [1, 10], 6) == 2 + 40


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([{"steps": 2}, {"fraction": 0.5}], r"exactly one phase must give neither .*: every phase gives one"),
        ([{}, {}], r"exactly one phase .*: phases \[0, 1\] give neither"),
        ([{}, {"steps": 2, "fraction": 0.5}], r"phases\[1\] gives both steps=2 and fraction=0.5"),
        ([{}, {"fraction": 0.7}, {"fraction": 0.6}], r"the fractions add up to 1.3"),
        ([{}, {"epochs": 1}], r"phases\[1\] has the keys \['epochs'\]"),
        ([{}, {"steps": 1, "views": 0}], r"phases\[1\]\.views must be null \(all\) or an integer >= 1"),
        ([{}, {"steps": 1, "masking": NONE, "keep_ratio": 0.5}], r"phases\[1\]\.masking .*keep_ratio"),
        ([{}, {"steps": 1, "keep_ratio": 1.5}], r"phases\[1\]\.masking .*keep_ratio must be a number in"),
        # A checkpoint's phases are data: a class outside aclip's masking registry is never imported.
        ([{}, {"steps": 1, "masking": {"_target_": "os.system"}}], r"phases\[1\]\.masking: .*'os.system'"),
    ],
)
def test_phases_that_cannot_work_are_refused_naming_the_key(phases, message):
    with pytest.raises(SpecError, match=message):
        build_phases(phases, RANDOM)
    with pytest.raises(SpecError, match=message):  # a checkpoint holding them
        AClip.check_hparams({"masking": RANDOM, "phases": phases})


def test_the_config_is_checked_before_anything_is_built(train_config):
    cfg = train_config("stages=unmasked_tuning")
    with open_dict(cfg):
        cfg.stages.phases[0].keep_ratio = 0.25  # of the run's masking, none, which has no keep ratio
    with pytest.raises(ConfigError, match=r"model\.phases\[0\]\.masking \(.*NoMasking\): .*keep_ratio"):
        validate_config(cfg)
    cfg = train_config("stages=unmasked_tuning")
    cfg.stages.phases[1].views = 2
    with pytest.raises(ConfigError, match=r"model\.phases\[1\]\.views=2, but the batches have data\.num_"):
        validate_config(cfg)
    cfg = train_config("stages=curriculum", "method=attentive_2x50")
    cfg.stages.phases[1].masking.unit = 3  # a 4 x 4 patch grid has no 3 x 3 cells
    with pytest.raises(ConfigError, match=r"model\.phases\[1\]\.masking .* does not fit model\.vision"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=r"budget\.flops must be null or a number > 0, got -1"):
        validate_config(train_config("budget.flops=-1"))


def test_an_attentive_phase_keeps_random_cells_while_the_teacher_warms_up(train_config):
    """attentive, random, none (`stages=curriculum`): the teacher warm-up replaces the attentive phase's
    choice while it lasts, and only there; the hand-over may come during another phase."""
    cfg = train_config(
        "method=attentive_2x50",
        "stages=curriculum",
        "model.teacher_warmup_steps=3",
        "model.teacher_warmup_until_loss=null",
    )
    module = instantiate(cfg.model)
    module.phase_ends = phase_ends(module.phases, 10)
    assert module.phase_ends == [4, 8, 10] and module.needs_teacher_crop

    def policy_at(step: int) -> Any:
        type(module).global_step = property(lambda self: step)
        try:
            return module.masking_policy, module.in_teacher_warmup
        finally:
            del type(module).global_step

    warmup, warming = policy_at(1)
    assert type(warmup) is RandomMasking and warming and warmup.keep_ratio == 0.5 and warmup.unit == 2
    assert policy_at(3) == (module.phases[0].masking, False)  # the teacher's choice from step 3 on
    assert isinstance(module.phases[0].masking, AttentiveLow)
    assert policy_at(4) == (module.phases[1].masking, False) and type(policy_at(4)[0]) is RandomMasking
    assert policy_at(9) == (module.phases[2].masking, False) and isinstance(policy_at(9)[0], NoMasking)


class RecordSteps(pl.Callback):
    """Test helper: what each training step showed the encoders, written to `path` at the end."""

    def __init__(self, path: str) -> None:
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: AClip, *args: Any) -> None:
        self.steps.append({"phase": pl_module.phase_index, "policy": type(pl_module.masking_policy).__name__})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: AClip, outputs: Any, *args: Any) -> None:
        self.steps[-1] |= {
            "views": outputs["num_views"],
            "images": outputs["views"].shape[0],
            "tokens": outputs["keep"].shape[1],
        }

    def on_train_end(self, *args: Any) -> None:
        Path(self.path).write_text(json.dumps(self.steps))


def test_each_phase_trains_with_its_policy_tokens_and_views_until_the_budget(
    train_config, tmp_path, monkeypatch
):
    """random 2 x 50 %, then FLIP's unmasked tuning (every patch of one view) for half of the run, on a
    budget of 4 steps' FLOPs (an epoch has 10): the online encoder's inputs, the logged phase, tokens and
    FLOPs, and timing.json follow the phase; the run and its learning-rate schedule end with the budget."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    record = tmp_path / "steps.json"
    overrides = ["method=random_2x50", "stages=unmasked_tuning", "stages.tuning_fraction=0.5"]
    cfg = train_config(*overrides)
    first, second = plan_compute(cfg, instantiate(cfg.model), instantiate(cfg.data)).step_flops
    budget = 2 * first + 2 * second  # 5 steps would be 2 masked and 3 unmasked
    cfg = train_config(
        *overrides,
        f"budget.flops={budget}",
        "data.train.size=80",
        "model.scheduler.warmup_epochs=0.1",  # one of the epoch's 10 steps
        "trainer.log_every_n_steps=1",
        "evaluation.at_end=false",
        "callbacks.model_checkpoint=null",
        *callback_overrides(Path(__file__).stem, "RecordSteps", path=record),
    )
    train(cfg)
    steps = json.loads(record.read_text())
    half, whole = (
        {"phase": 0, "views": 2, "images": 16, "tokens": 8, "policy": "RandomMasking"},
        {"phase": 1, "views": 1, "images": 8, "tokens": 16, "policy": "NoMasking"},
    )
    assert steps == [half, half, whole, whole]  # batch 8, a 4 x 4 patch grid
    rows = [row for row in read_csv_metrics(tmp_path / "run") if row.get("train/loss")]
    assert [float(row["train/phase"]) for row in rows] == [0, 0, 1, 1]
    assert [float(row["train/kept_tokens"]) for row in rows] == [8, 8, 16, 16]
    flops = [float(row["train/flops"]) for row in rows]
    assert flops == pytest.approx([first, 2 * first, 2 * first + second, budget])
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["flops_per_step"] == [first, second] and first != second  # counted per phase
    assert timing["training_flops"] == timing["budget_flops"] == budget
    assert [(phase["steps"], phase["kept_tokens"], phase["num_views"]) for phase in timing["phases"]] == [
        (2, 8, 2),
        (2, 16, 1),
    ]
    assert timing["kept_tokens"] == 12 and timing["num_views"] == 1.5  # the means over the steps
    # The schedule spans the budget's 4 steps, not the epoch's 10: one warm-up step, then a cosine whose
    # last step is a quarter of the way from its floor (over 10 steps: 0.88 of the way).
    lr, floor = cfg.model.optimizer.lr, cfg.model.scheduler.min_lr
    assert float(rows[-1]["train/lr"]) == pytest.approx(floor + 0.25 * (lr - floor))


@pytest.mark.slow  # about 35 s: three runs
def test_a_run_killed_inside_its_second_phase_resumes_in_it(train_config, tmp_path, monkeypatch):
    """A-CLIP (two attentive views, SimCLR and BYOL), then unmasked tuning (one view: no SimCLR) for the
    second half of 6 steps; killed after step 5 with last.ckpt at step 4, inside the tuning: the resumed
    run trains its last steps in the tuning and ends where the uninterrupted run ends."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    staged = [*RUN, "stages=unmasked_tuning", "stages.tuning_fraction=0.5", "trainer.log_every_n_steps=1"]
    full = tmp_path / "full.pt"
    train(train_config(*staged, *helper("SaveFinalState", path=full), output_dir=tmp_path / "full"))
    run_dir = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(train_config(*staged, *helper("CrashAt", step=5), output_dir=run_dir))
    resumed = tmp_path / "resumed.pt"
    train(
        train_config(*staged, "ckpt_path=last", *helper("SaveFinalState", path=resumed), output_dir=run_dir)
    )

    rows = [row for row in read_csv_metrics(run_dir) if row.get("train/phase")]
    assert [(int(row["step"]), float(row["train/phase"])) for row in rows][-2:] == [(4, 1.0), (5, 1.0)]
    assert not any(row.get("train/simclr_loss") for row in rows[-2:])  # one view: nothing to compare
    expected, actual = final_state(full), final_state(resumed)
    assert actual["global_step"] == expected["global_step"] == 6
    assert_same_tensors(actual["weights"], expected["weights"])
    assert_same_tensors(actual["optimizer"], expected["optimizer"])
