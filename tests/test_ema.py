"""The EMA teacher: momentum schedule, update rule, and the callback inside real Lightning fits."""

from __future__ import annotations

import copy
import csv
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

import aclip.callbacks.ema as ema_module
from aclip.callbacks.ema import EMAUpdate, ema_momentum, ema_update
from aclip.config import validate_config
from aclip.tasks import train
from aclip.trained import load_checkpoint
from tests.helpers import TINY_SYNTHETIC_OVERRIDES, compose_config

BASE = 0.5  # a fast teacher in the fits below, so that every EMA step moves the weights visibly


def expected_momentum(step: int, total: int, base: float = BASE, final: float = 1.0) -> float:
    """BYOL's cosine schedule, written out independently of `ema_momentum`."""
    return final - (final - base) * (1 + math.cos(math.pi * min(step / total, 1.0))) / 2


def clone_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def read_momenta(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as file:
        return [
            float(row["train/ema_momentum"]) for row in csv.DictReader(file) if row.get("train/ema_momentum")
        ]


# --------------------------------------------------------------------------------------------------
# ema_momentum
# --------------------------------------------------------------------------------------------------


def test_momentum_endpoints_and_midpoint():
    assert ema_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert ema_momentum(250, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert ema_momentum(50, 100, 0.9, 0.99) == pytest.approx((0.9 + 0.99) / 2)
    assert ema_momentum(0, 10, 0.7, 0.9) == pytest.approx(0.7)
    assert ema_momentum(10, 10, 0.7, 0.9) == pytest.approx(0.9)


def test_momentum_defaults_are_the_papers():
    assert ema_momentum(0, 1000) == pytest.approx(0.996)
    assert ema_momentum(1000, 1000) == pytest.approx(1.0)


def test_momentum_is_cosine_and_monotone():
    values = [ema_momentum(step, 40, 0.9, 1.0) for step in range(41)]
    assert all(a < b for a, b in itertools.pairwise(values))
    for step, value in enumerate(values):
        assert value == pytest.approx(expected_momentum(step, 40, 0.9, 1.0))
    # Cosine, not linear: slow at both ends, fast in the middle.
    assert values[1] - values[0] < values[21] - values[20]
    assert values[40] - values[39] < values[21] - values[20]


# --------------------------------------------------------------------------------------------------
# ema_update
# --------------------------------------------------------------------------------------------------


def test_ema_update_two_steps_closed_form():
    torch.manual_seed(0)
    online = nn.Linear(5, 3)
    ema = copy.deepcopy(online).requires_grad_(False)
    e0 = clone_params(ema)
    m0, m1 = 0.9, 0.6
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    p1 = clone_params(online)
    ema_update(ema, online, m0)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(-2.0).add_(1.0)
    p2 = clone_params(online)
    ema_update(ema, online, m1)
    for name, value in ema.named_parameters():
        expected = m1 * (m0 * e0[name] + (1 - m0) * p1[name]) + (1 - m1) * p2[name]
        torch.testing.assert_close(value, expected)
        assert not torch.allclose(value, p2[name])
        assert not value.requires_grad and value.grad_fn is None
    # The online model is untouched by the update.
    for name, value in online.named_parameters():
        torch.testing.assert_close(value.detach(), p2[name])


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_ema_update_extreme_momenta(momentum):
    torch.manual_seed(0)
    online, ema = nn.Linear(4, 4), nn.Linear(4, 4).requires_grad_(False)
    before = clone_params(ema)
    ema_update(ema, online, momentum)
    source = before if momentum == 1.0 else clone_params(online)
    for name, value in ema.named_parameters():
        torch.testing.assert_close(value, source[name])


def test_ema_update_copies_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = copy.deepcopy(online).requires_grad_(False)
    online.train()
    online(torch.randn(16, 4) * 3 + 2)  # moves running_mean / running_var / num_batches_tracked
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert not torch.allclose(online[1].running_mean, ema[1].running_mean)
    ema_update(ema, online, 0.9)
    for (name, ema_buffer), (_, online_buffer) in zip(
        ema.named_buffers(), online.named_buffers(), strict=True
    ):
        assert torch.equal(ema_buffer, online_buffer), name
    assert ema[1].num_batches_tracked.item() == 1
    # ... while parameters are averaged, not copied.
    torch.testing.assert_close(ema[0].weight, online[0].weight - 0.9)


def test_ema_update_rejects_different_models():
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), 0.9)


# --------------------------------------------------------------------------------------------------
# EMAUpdate: construction
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "final"), [(0.999, 0.99), (1.0, 0.5), (-0.1, 1.0), (0.9, 1.1)])
def test_callback_rejects_bad_momenta(base, final):
    with pytest.raises(ValueError, match="base_momentum"):
        EMAUpdate(base_momentum=base, final_momentum=final)


def test_callback_accepts_equal_momenta():
    callback = EMAUpdate(base_momentum=0.99, final_momentum=0.99)
    assert (callback.base_momentum, callback.final_momentum) == (0.99, 0.99)


def test_callback_needs_an_ema_model():
    callback = EMAUpdate()
    with pytest.raises(TypeError, match="ema_model"):
        callback.on_train_start(SimpleNamespace(global_step=0), pl.LightningModule())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_callback_moves_every_ema_pair_of_the_module(train_config):
    """With BYOL on, the EMA projector is a second (EMA, online) pair: frozen, moved, and in the module's
    mode (its batch norms use the batch's statistics in training, as A-CLIP's), unlike the EMA model."""
    module = instantiate(train_config("model.self_supervision.byol_weight=1.0").model)
    pairs = module.ema_pairs()
    assert len(pairs) == 2
    assert pairs[0][0] is module.ema_model and pairs[0][1] is module.model
    projector_ema, projector = pairs[1]
    assert projector_ema is module.self_supervision.ema_projector
    assert projector is module.self_supervision.byol_projector
    assert all(not p.requires_grad for p in projector_ema.parameters())
    module.train()
    assert not any(m.training for m in module.ema_model.modules())
    assert all(m.training for m in projector_ema.modules())
    with torch.no_grad():
        for online in (module.model, projector):
            for p in online.parameters():
                p.add_(0.5)
    before = [clone_params(ema) for ema, _ in pairs]
    online_now = [clone_params(online) for _, online in pairs]
    callback = EMAUpdate(base_momentum=BASE)
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=2)
    callback.on_train_start(trainer, module)
    trainer.global_step = 1  # one optimizer step done
    callback.on_train_batch_end(trainer, module, None, None, 0)
    for (ema, _), e0, p1 in zip(pairs, before, online_now, strict=True):
        for name, value in ema.named_parameters():
            torch.testing.assert_close(value, BASE * e0[name] + (1 - BASE) * p1[name])
    # Same global step again (a micro-batch without an optimizer step): no second update.
    callback.on_train_batch_end(trainer, module, None, None, 1)
    for (ema, _), e0, p1 in zip(pairs, before, online_now, strict=True):
        for name, value in ema.named_parameters():
            torch.testing.assert_close(value, BASE * e0[name] + (1 - BASE) * p1[name])


# --------------------------------------------------------------------------------------------------
# EMAUpdate inside a real fit
# --------------------------------------------------------------------------------------------------


class Recorder(pl.Callback):
    """Placed before EMAUpdate: sees the online weights after each optimizer step, before the EMA moves."""

    def __init__(self):
        self.start_online = None
        self.start_ema = None
        self.online = []  # online parameters after each batch's optimizer step
        self.ema_before_update = []  # EMA parameters at the same moment
        self.ema_training = []
        self.global_steps = []

    def on_train_start(self, trainer, pl_module):
        self.start_online = clone_params(pl_module.model)
        self.start_ema = clone_params(pl_module.ema_model)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.online.append(clone_params(pl_module.model))
        self.ema_before_update.append(clone_params(pl_module.ema_model))
        self.ema_training.append(
            pl_module.ema_model.training or any(m.training for m in pl_module.ema_model.modules())
        )
        self.global_steps.append(trainer.global_step)


def fit(cfg, *extra_callbacks, ckpt_path=None):
    """Fit like `aclip.tasks.train`, with `extra_callbacks` placed before the configured ones."""
    module = instantiate(cfg.model)
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node and "_target_" in node]
    loggers = [instantiate(node) for node in cfg.logger.values() if node and "_target_" in node]
    trainer = instantiate(cfg.trainer, callbacks=[*extra_callbacks, *callbacks], logger=loggers)
    trainer.fit(module, datamodule=instantiate(cfg.data), ckpt_path=ckpt_path)
    return module, trainer


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Two optimizer steps (lr 1e-2, EMA base momentum 0.5), recorded, checkpointed and logged to CSV."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    cfg = compose_config(
        "train",
        [
            *TINY_SYNTHETIC_OVERRIDES,
            "trainer.limit_train_batches=2",
            "trainer.log_every_n_steps=1",
            "evaluation.at_end=false",
            "model.optimizer.lr=1e-2",
            "model.scheduler.warmup_epochs=0",
            f"callbacks.ema.base_momentum={BASE}",
            "callbacks.mask_pictures=null",
        ],
        run_dir,
    )
    recorder = Recorder()
    module, trainer = fit(cfg, recorder)
    return SimpleNamespace(cfg=cfg, module=module, trainer=trainer, recorder=recorder, run_dir=run_dir)


def test_fit_ema_equals_closed_form_recursion(two_steps):
    recorder, module = two_steps.recorder, two_steps.module
    assert two_steps.trainer.global_step == 2 and recorder.global_steps == [1, 2]
    e0, (p1, p2) = recorder.start_ema, recorder.online
    # The teacher starts as a copy of the online model, and the recorder ran before the EMA moved.
    for name in e0:
        torch.testing.assert_close(e0[name], recorder.start_online[name])
        torch.testing.assert_close(recorder.ema_before_update[0][name], e0[name])
    m0, m1 = expected_momentum(0, 2), expected_momentum(1, 2)
    assert (m0, m1) == pytest.approx((0.5, 0.75))
    final = dict(module.ema_model.named_parameters())
    moved = 0
    for name, e2 in final.items():
        expected = m1 * (m0 * e0[name] + (1 - m0) * p1[name]) + (1 - m1) * p2[name]
        torch.testing.assert_close(e2, expected, rtol=1e-5, atol=1e-6)
        # After step 1, the EMA was already m0 * e0 + (1 - m0) * p1.
        torch.testing.assert_close(
            recorder.ema_before_update[1][name], m0 * e0[name] + (1 - m0) * p1[name], rtol=1e-5, atol=1e-6
        )
        moved += not torch.allclose(e2, e0[name], atol=1e-5)
    assert moved > len(final) // 2  # the online model trained, so the teacher moved


def test_fit_ema_buffers_follow_online(two_steps):
    module = two_steps.module
    for (name, ema_buffer), (_, online_buffer) in zip(
        module.ema_model.named_buffers(), module.model.named_buffers(), strict=True
    ):
        torch.testing.assert_close(ema_buffer, online_buffer, msg=name)


def test_fit_ema_not_optimised_and_stays_in_eval_mode(two_steps):
    module, trainer = two_steps.module, two_steps.trainer
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    ema_params = list(module.ema_model.parameters())
    assert ema_params and all(not p.requires_grad for p in ema_params)
    assert not optimised & {id(p) for p in ema_params}
    assert {id(p) for p in module.model.parameters()} <= optimised
    assert all(p.grad is None for p in ema_params)
    # The teacher never trains (no dropout / drop-path), even while the module is in train mode.
    assert two_steps.recorder.ema_training == [False, False]
    module.train()
    assert module.model.training and not any(m.training for m in module.ema_model.modules())


def test_fit_logs_ema_momentum(two_steps):
    assert read_momenta(two_steps.run_dir) == pytest.approx([0.5, 0.75])


def test_ema_survives_checkpoint_round_trip(two_steps):
    module = two_steps.module
    loaded = load_checkpoint(two_steps.run_dir / "checkpoints" / "last.ckpt")
    trained_ema, loaded_ema = module.ema_model.state_dict(), loaded.ema_model.state_dict()
    assert trained_ema.keys() == loaded_ema.keys()
    for name, value in trained_ema.items():
        torch.testing.assert_close(loaded_ema[name], value, msg=name)
    online = loaded.model.state_dict()
    assert any(not torch.allclose(loaded_ema[name], online[name]) for name in online)
    assert all(not p.requires_grad for p in loaded.ema_model.parameters())


def test_gradient_accumulation_updates_once_per_optimizer_step(train_config, tmp_path, monkeypatch):
    """4 micro-batches, accumulate 2: two optimizer steps, two EMA updates, momenta over 2 steps.

    Then resume from the checkpoint for a second epoch: two more updates, continuing the schedule.
    """
    momenta = []
    original = ema_module.ema_update

    def counting(ema, online, momentum):
        momenta.append(momentum)
        original(ema, online, momentum)

    monkeypatch.setattr(ema_module, "ema_update", counting)
    overrides = [
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
        "evaluation.at_end=false",
        f"callbacks.ema.base_momentum={BASE}",
        "callbacks.mask_pictures=null",
    ]
    cfg = train_config(*overrides)
    recorder = Recorder()
    _, trainer = fit(cfg, recorder)
    assert len(recorder.global_steps) == 4  # micro-batches seen
    assert trainer.global_step == 2
    assert momenta == pytest.approx([expected_momentum(0, 2), expected_momentum(1, 2)])
    assert read_momenta(tmp_path / "run") == pytest.approx(momenta)
    # The EMA did not move after the micro-batches without an optimizer step.
    torch.testing.assert_close(recorder.ema_before_update[1], recorder.ema_before_update[0])
    torch.testing.assert_close(recorder.ema_before_update[3], recorder.ema_before_update[2])
    assert any(
        not torch.allclose(recorder.ema_before_update[2][n], recorder.ema_before_update[1][n])
        for n in recorder.start_ema
    )

    # Resume into a second epoch: 4 optimizer steps in all, the schedule continues at step 2 of 4.
    momenta.clear()
    resumed_cfg = train_config(*overrides, "trainer.max_epochs=2", output_dir=tmp_path / "resumed")
    _, trainer = fit(resumed_cfg, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert trainer.global_step == 4
    assert momenta == pytest.approx([expected_momentum(2, 4), expected_momentum(3, 4)])


def test_attentive_masking_without_ema_callback_fails_at_start_up(train_config):
    cfg = train_config(
        "masking=attentive_low", "callbacks=none", "evaluation.at_end=false", "trainer.max_steps=1"
    )
    assert not any("_target_" in (node or {}) for node in (cfg.callbacks or {}).values())
    with pytest.raises(ValueError, match=r"EMAUpdate[\s\S]*callbacks\.ema"):
        train(cfg)


def test_plain_clip_without_ema_callback_only_warns(train_config):
    """Without attentive masking or BYOL, a missing EMAUpdate is allowed: a warning, and a frozen teacher."""
    cfg = train_config("callbacks=none", "evaluation.at_end=false", "trainer.max_steps=1")
    module = instantiate(cfg.model)
    before = clone_params(module.ema_model)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    with pytest.warns(UserWarning, match="no EMAUpdate callback"):  # the start-up check
        validate_config(cfg)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert trainer.global_step == 1
    for name, value in module.ema_model.named_parameters():
        torch.testing.assert_close(value, before[name])
