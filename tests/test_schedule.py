"""Tests for the linear warm-up + cosine learning-rate schedule."""

import itertools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from aclip.modules.schedule import WarmupCosine, warmup_cosine_lr

TOTAL, WARMUP = 100, 10
BASE, START, FINAL = 5e-4, 1e-6, 1e-5


def lr(step, total=TOTAL, warmup=WARMUP, base=BASE, start=START, final=FINAL):
    return warmup_cosine_lr(step, total, warmup, base_lr=base, start_lr=start, final_lr=final)


def test_starts_at_start_lr():
    assert lr(0) == pytest.approx(START)


def test_linear_warmup():
    for step in range(WARMUP):
        assert lr(step) == pytest.approx(START + (BASE - START) * step / WARMUP)
    assert all(lr(s) < lr(s + 1) for s in range(WARMUP))


def test_reaches_base_lr_at_end_of_warmup():
    assert lr(WARMUP) == pytest.approx(BASE)


def test_cosine_midpoint_is_mean_of_base_and_final():
    midpoint = WARMUP + (TOTAL - WARMUP) // 2
    assert lr(midpoint) == pytest.approx((BASE + FINAL) / 2)


def test_cosine_shape():
    """A quarter of the way through the decay the lr is final + (base - final) * (1 + cos(pi / 4)) / 2."""
    total = WARMUP + 80  # 80 decay steps: a quarter is 20
    expected = FINAL + (BASE - FINAL) * (1 + math.cos(math.pi / 4)) / 2
    assert lr(WARMUP + 20, total=total) == pytest.approx(expected)
    assert lr(WARMUP + 60, total=total) == pytest.approx(
        FINAL + (BASE - FINAL) * (1 + math.cos(3 * math.pi / 4)) / 2
    )


@pytest.mark.parametrize("step", [TOTAL, TOTAL + 1, 2 * TOTAL, 10 * TOTAL])
def test_final_lr_at_and_after_total_steps(step):
    assert lr(step) == pytest.approx(FINAL)


def test_monotone_non_increasing_after_warmup():
    values = [lr(step) for step in range(WARMUP, TOTAL + 20)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[0] > values[-1]
    assert all(FINAL - 1e-12 <= v <= BASE + 1e-12 for v in values)


def test_zero_warmup_starts_at_base_lr():
    assert lr(0, warmup=0) == pytest.approx(BASE)
    assert lr(TOTAL // 2, warmup=0) == pytest.approx((BASE + FINAL) / 2)
    assert lr(TOTAL, warmup=0) == pytest.approx(FINAL)


def test_warmup_longer_than_total_does_not_divide_by_zero():
    assert lr(TOTAL, total=TOTAL, warmup=TOTAL) == pytest.approx(BASE)
    assert lr(TOTAL + 1, total=TOTAL, warmup=TOTAL) == pytest.approx(FINAL)


def trainer(steps_per_epoch: int, epochs: int) -> SimpleNamespace:
    """What the schedule reads of a Lightning trainer."""
    return SimpleNamespace(
        estimated_stepping_batches=steps_per_epoch * epochs,
        num_training_batches=steps_per_epoch,
        accumulate_grad_batches=1,
    )


def test_warns_when_the_warmup_covers_the_whole_run():
    """`model=vit_b16` (one warm-up epoch) in a one-epoch run never reaches its learning rate."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=BASE)
    with pytest.warns(UserWarning, match=r"warm-up covers the whole run \(100 steps, [^)]*warmup_epochs=1"):
        WarmupCosine(warmup_epochs=1.0).scheduler(optimizer, trainer(100, epochs=1))
    with pytest.warns(UserWarning, match=r"\(500 steps, model.scheduler.warmup_steps=500, in a run of 300"):
        WarmupCosine(warmup_steps=500).scheduler(optimizer, trainer(100, epochs=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WarmupCosine(warmup_epochs=1.0).scheduler(optimizer, trainer(100, epochs=2))
