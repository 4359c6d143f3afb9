"""Every masking policy inside the training step: what the online encoder sees, and what is logged."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from aclip.modules.masking import RandomMasking
from aclip.tasks import train
from tests.helpers import CONF_DIR

STRATEGIES = sorted(p.stem for p in (CONF_DIR / "masking").glob("*.yaml"))


def one_step(train_config, tmp_path, *overrides):
    cfg = train_config(
        "trainer.max_steps=1",
        "trainer.log_every_n_steps=1",
        "evaluation.at_end=false",
        "callbacks.model_checkpoint=null",
        *overrides,
    )
    train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        row = next(r for r in csv.DictReader(file) if r.get("train/loss"))
    return cfg, row


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_and_logs_kept_tokens(train_config, tmp_path, strategy):
    cfg, row = one_step(train_config, tmp_path, f"masking={strategy}")
    masking = instantiate(cfg.masking)
    side = masking.view_size(cfg.model.vision.image_size, cfg.model.vision.patch_size)
    grid = (side // cfg.model.vision.patch_size,) * 2
    assert float(row["train/kept_tokens"]) == masking.num_keep(grid)
    assert float(row["train/ema_momentum"]) == pytest.approx(cfg.callbacks.ema.base_momentum)
    if masking.needs_scores:
        assert 0.0 < float(row["train/kept_score_mass"]) <= 1.0
        # The teacher's score mass on the built-in data's objects, beside the share of area they cover.
        assert 0.0 < float(row["train/object_score_mass"]) < 1.0
        assert 0.0 < float(row["train/object_area"]) < 1.0
    else:
        assert not row.get("train/kept_score_mass") and not row.get("train/object_score_mass")
    recall = float(row["train/object_recall"])  # every policy: how much of the object its views keep
    keeps_all = strategy in ("none", "resize")  # resizing keeps every patch of a smaller image
    assert recall == pytest.approx(1.0) if keeps_all else 0.0 < recall < 1.0


def first_step_inputs(cfg) -> dict:
    """Fit one step; return the views and `keep` given to the online vision tower, and the EMA's
    scores of those views taken at that moment (before the optimizer and EMA steps)."""
    module = instantiate(cfg.model)
    seen = {}

    def spy(tower, args):
        images, keep = args
        if "keep" not in seen:
            seen.update(images=images, keep=keep, scores=module.ema_model.vision.cls_attention(images))

    module.model.vision.register_forward_pre_hook(spy)
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node]
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, max_steps=1)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    return seen


def test_attentive_low_keeps_the_cells_the_ema_attends_to_most(train_config):
    cfg = train_config(
        "masking=attentive_low",
        "model.teacher_warmup_steps=0",
        "model.teacher_warmup_until_loss=null",
        "callbacks.model_checkpoint=null",
    )
    seen = first_step_inputs(cfg)
    expected = seen["scores"].topk(8, dim=1).indices.sort(dim=1).values  # half of the 4 x 4 grid
    torch.testing.assert_close(seen["keep"], expected)


def test_during_the_teacher_warm_up_attentive_masking_keeps_random_cells_of_its_budget(train_config):
    cfg = train_config(
        "masking=attentive_low",
        "model.teacher_warmup_steps=1",
        "model.teacher_warmup_until_loss=null",
        "callbacks.model_checkpoint=null",
    )
    seen = first_step_inputs(cfg)
    top = seen["scores"].topk(8, dim=1).indices.sort(dim=1).values
    assert seen["keep"].shape == top.shape and not torch.equal(seen["keep"], top)

    module = instantiate(cfg.model)
    assert isinstance(module.masking_policy, RandomMasking) and module.masking_policy.keep_ratio == 0.5
    type(module).global_step = property(lambda self: 1)
    try:
        assert module.masking_policy is module.masking  # the teacher decides from step 1 on
    finally:
        del type(module).global_step
    with pytest.raises(InstantiationException, match="teacher_warmup_steps must be an integer >= 0"):
        instantiate(train_config("model.teacher_warmup_steps=-1").model)


def test_resize_runs_the_tower_at_the_smaller_grid(train_config):
    seen = first_step_inputs(train_config("masking=resize", "callbacks.model_checkpoint=null"))
    assert seen["images"].shape[-2:] == (16, 16)  # 32 px views at scale 0.5
    assert seen["keep"].shape[1] == 4  # every patch of the 2 x 2 grid


def test_masks_are_reproducible_per_step_and_differ_across_ranks_and_steps(train_config):
    module = instantiate(train_config("masking=random").model)

    def mask(rank, step, batch_idx=0):
        module._trainer = None
        type(module).global_rank = property(lambda self: rank)
        type(module).global_step = property(lambda self: step)
        try:
            return module.masking.select(None, (4, 4), 8, generator=module.mask_generator(batch_idx))
        finally:
            del type(module).global_rank, type(module).global_step

    assert torch.equal(mask(0, 3), mask(0, 3))
    assert not torch.equal(mask(0, 3), mask(1, 3))
    assert not torch.equal(mask(0, 3), mask(0, 4))
    assert not torch.equal(mask(0, 3, 0), mask(0, 3, 1))
