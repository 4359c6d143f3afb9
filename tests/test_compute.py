"""Training compute: FLOPs counted on fake tensors before training, and budgets that end runs alike."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from aclip.callbacks.throughput import Throughput
from aclip.compute import count_batch_flops, example_sample, plan_compute, steps_within
from aclip.datamodules.datamodule import ImageTextDataset
from aclip.errors import ConfigError
from aclip.flop_counter import flop_counter
from aclip.modules.stages import build_phases, flops_until, phase_ends
from aclip.summary.compute_chart import COMPUTE_FILE
from tests.helpers import REPO, TINY_SYNTHETIC_OVERRIDES, fresh_copy, run_train_py
from tests.test_summarize import read_csv

RANDOM = {"_target_": "aclip.modules.masking.RandomMasking", "keep_ratio": 0.5}
TUNING = [{}, {"fraction": 0.1, "masking": {"_target_": "aclip.modules.masking.NoMasking"}, "views": 1}]


def real_batch(cfg: Any, datamodule: Any, size: int) -> dict[str, torch.Tensor]:
    """A batch of `size` training samples of the built-in data, as the run's loader makes them."""
    dataset = ImageTextDataset(datamodule.train_source, datamodule.prepare_pair)
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=size)))


# One preset per path of the step: A-CLIP (teacher scores, two views, SimCLR, BYOL) and a policy that
# loops until its budget in the default suite; one view, two random views, resized views and a policy that
# reads pixels among the slow tests.
@pytest.mark.parametrize(
    "method",
    [
        "aclip",
        "blockwise",
        *(
            pytest.param(m, marks=pytest.mark.slow)
            for m in ("clip", "random_2x50", "clipa_resize", "cluster")
        ),
    ],
)
def test_the_count_on_fake_tensors_is_a_real_steps_and_changes_nothing(train_config, method):
    cfg = train_config(f"method={method}")
    datamodule, module = instantiate(cfg.data), instantiate(cfg.model)
    datamodule.view_transform.teacher_crop = module.needs_teacher_crop
    weights, random_state = copy.deepcopy(module.state_dict()), torch.get_rng_state()
    (counted,) = count_batch_flops(module, example_sample(datamodule, module.needs_teacher_crop), 8)
    assert torch.equal(torch.get_rng_state(), random_state)
    assert all(torch.equal(value, weights[key]) for key, value in module.state_dict().items())
    assert all(parameter.grad is None for parameter in module.parameters())

    phase = module.phases[0]
    with flop_counter() as counter:
        step = module.forward_step(real_batch(cfg, datamodule, 8), phase, phase.masking, torch.Generator())
        step["loss"].backward()
    real = counter.get_total_flops()
    if method == "cluster":  # its choice compares the cells' pixels, which the count leaves out
        assert 0 < real - counted < 0.001 * real
    else:
        assert counted == real


# In a fresh interpreter, whose first backward pass is then the count's on fake tensors, as in a run.
FORK_AFTER_THE_COUNT = """
import os, sys
import torch
from hydra.utils import instantiate
from aclip.compute import count_batch_flops, example_sample
from tests.helpers import TINY_SYNTHETIC_OVERRIDES, compose_config

cfg = compose_config("train", TINY_SYNTHETIC_OVERRIDES, __import__("pathlib").Path(sys.argv[1]))
datamodule, module = instantiate(cfg.data), instantiate(cfg.model)
count_batch_flops(module, example_sample(datamodule, module.needs_teacher_crop), 2)
child = os.fork()
if child == 0:  # a fork-started DDP rank's first step
    torch.nn.Linear(2, 2)(torch.ones(1, 2)).sum().backward()
    os._exit(0)
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_process_forked_after_the_count_can_still_train(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_THE_COUNT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_budget_buys_the_steps_whose_next_one_would_overspend():
    phases = build_phases(TUNING, RANDOM)  # masked, then 10 % unmasked: 3 and 2 FLOPs a step
    for budget in range(20, 400, 7):
        steps = steps_within(budget, phases, [3, 2])
        spent = [flops_until(phase_ends(phases, n), [3, 2], n) for n in (steps, steps + 1)]
        assert spent[0] <= budget < spent[1], budget
    # A curriculum of three phases, the dearest last: one more step may move steps between phases.
    curriculum = build_phases([{"fraction": 0.4}, {"fraction": 0.4}, {}], RANDOM)
    for budget in range(50, 2000, 13):
        steps = steps_within(budget, curriculum, [2, 1, 5])
        spent = [flops_until(phase_ends(curriculum, n), [2, 1, 5], n) for n in (steps, steps + 1)]
        assert spent[0] <= budget < spent[1], budget
    fixed = build_phases(
        [{}, {"steps": 10, "masking": {"_target_": "aclip.modules.masking.NoMasking"}}], RANDOM
    )
    assert steps_within(20, fixed, [1, 2]) == 10  # the fixed phase alone
    with pytest.raises(ConfigError, match=r"budget.flops=19 buys fewer than the 10 optimizer steps"):
        steps_within(19, fixed, [1, 2])


def test_equal_budgets_end_every_method_within_one_step_of_it(train_config):
    """The core of a `budget.flops` sweep, counted: CLIP and random 2 x 50 % with unmasked tuning, whose
    steps cost different FLOPs, get lengths that spend the same budget to within one step."""
    budget = 3e9
    for method in ("clip", "random_2x50"):
        cfg = train_config(f"method={method}", "stages=unmasked_tuning", f"budget.flops={budget}")
        module = instantiate(cfg.model)
        plan = plan_compute(cfg, module, instantiate(cfg.data))
        steps = plan.max_steps
        spent = [flops_until(phase_ends(module.phases, n), plan.step_flops, n) for n in (steps, steps + 1)]
        assert spent[0] <= budget < spent[1]
        assert plan.trainer_limits() == {"max_steps": steps, "max_epochs": steps}
        assert module.phase_batch_flops == plan.batch_flops  # train/flops and the throughput's
    cfg = train_config("budget.seconds=90")  # Lightning's max_time; the schedule keeps its length
    plan = plan_compute(cfg, instantiate(cfg.model), instantiate(cfg.data))
    assert plan.trainer_limits() == {"max_time": {"seconds": 90}}


class RecordFlops(pl.Callback):
    """Test helper: the FLOPs per batch the throughput monitor saw at each step, written to `path`."""

    def __init__(self, path: str) -> None:
        self.path, self.flops = path, []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.flops.append(pl_module.flops_per_batch)

    def on_train_end(self, *args: Any) -> None:
        Path(self.path).write_text(json.dumps(self.flops))


def test_the_throughput_counts_each_phases_flops(train_config, tmp_path):
    """Without the count before training, the Throughput callback counts the first batch of each phase
    (the masked step's FLOPs would otherwise stand for the unmasked tuning's)."""
    record = tmp_path / "flops.json"
    cfg = train_config(
        "method=random_2x50",
        "stages=unmasked_tuning",
        "stages.tuning_fraction=0.5",
        "trainer.max_steps=4",
    )
    datamodule, module = instantiate(cfg.data), instantiate(cfg.model)
    counted = count_batch_flops(module, example_sample(datamodule, False), 8)
    callbacks = [Throughput(window_size=2), RecordFlops(str(record))]
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    assert json.loads(record.read_text()) == [counted[0], counted[0], counted[1], counted[1]]


@pytest.mark.slow  # about a minute: four tiny jobs
def test_the_laboratory_sweep_runs_from_a_fresh_clone_at_equal_flops(tmp_path):
    """README's laboratory command at the test scale: every job stops within one optimizer step of the
    same FLOP count, and the summary has the columns and the compute chart."""
    copy = fresh_copy(tmp_path / "repository")
    budget = 1e9  # about 6 steps of the tests' tiny model at batch 8
    command = [
        "-m",
        "method=clip,random_2x50",
        "stages=unmasked_tuning",
        f"budget.flops={budget}",
        "seed=0,1",
    ]
    run_train_py(*command, *TINY_SYNTHETIC_OVERRIDES, cwd=copy, timeout=900)
    (sweep,) = (copy / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir() and path.name.isdigit())
    assert len(jobs) == 4
    spent = []
    for job in jobs:
        timing = json.loads((job / "timing.json").read_text())
        assert 0 <= budget - timing["training_flops"] < max(timing["flops_per_step"]), timing
        spent.append(timing["training_flops"])
    assert [float(row["training FLOPs"]) for row in read_csv(sweep / "summary.csv")] == spent
    assert (sweep / COMPUTE_FILE).stat().st_size > 10_000
