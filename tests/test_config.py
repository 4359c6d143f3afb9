"""Config composition for every option of every group, and start-up validation of bad values."""

from __future__ import annotations

import math

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aclip.config import resolved_job_config, validate_config
from aclip.distributed import world_size
from aclip.errors import ConfigError
from aclip.modules.vision import VisionTower
from aclip.tasks import evaluate_checkpoint, train
from tests.helpers import A_CLIP_OPTIMIZER, CONF_DIR, compose_config

GROUPS = sorted(path.name for path in CONF_DIR.iterdir() if path.is_dir())


def group_options(group: str) -> list[str]:
    # Files starting with "_" are bases that other options of the group extend.
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_every_group_has_options():
    expected = {
        *("callbacks", "data", "debug", "hydra", "logger", "masking", "model", "paths", "text_masking"),
        "trainer",
    }
    assert expected <= set(GROUPS)
    for group in expected:
        assert group_options(group), f"conf/{group} has no options"


# Values a preset leaves to the command line (`${aclip.required:...}`), as a user would give them.
REQUIRED_VALUES = {
    "data.train.urls": "'/data/laion400m/{00000..00009}.tar'",
    "data.train.num_samples": "100000",
    "model.init_from": "/runs/stage1",
    "data.train.path": "/data/cc3m/train.tsv",
}


def required_keys(cfg) -> list[str]:
    """The keys of `cfg` whose value is an `aclip.required` interpolation."""
    found = []

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, str) and value.startswith("${aclip.required:"):
                found.append(f"{prefix}{key}")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(train_config, group, option):
    cfg = train_config(f"{group}={option}")
    given = [f"{key}={REQUIRED_VALUES[key]}" for key in required_keys(cfg)]
    cfg = train_config(f"{group}={option}", *given) if given else cfg
    assert OmegaConf.select(cfg, f"hydra.runtime.choices.{group}") == option
    resolved_job_config(cfg)
    validate_config(cfg)


@pytest.mark.parametrize(
    ("task", "overrides", "missing"),
    [
        ("train", ["data=csv"], "data.train.path"),
        ("train", ["data=webdataset"], "data.train.num_samples"),
        ("eval", [], "ckpt_path"),
    ],
)
def test_a_value_only_the_user_knows_is_named_before_anything_starts(tmp_path, task, overrides, missing):
    """`train.py data=csv` without its file, or `evaluate.py` without a checkpoint: one line naming the key
    (an InputError, printed without a traceback), not OmegaConf's MissingMandatoryValue from deep inside
    instantiate."""
    cfg = compose_config(task, overrides, tmp_path)
    start = validate_config if task == "train" else evaluate_checkpoint
    with pytest.raises(ConfigError, match=rf"^{missing} is required here: give {missing}=<.+> on the"):
        start(cfg)


def test_eval_config_composes(tmp_path):
    cfg = compose_config("eval", ["ckpt_path=some.ckpt"], tmp_path)
    resolved = resolved_job_config(cfg)
    assert resolved["ckpt_path"] == "some.ckpt"
    assert resolved["evaluation"]["loader"]["image_size"] is None  # filled from the checkpoint


def test_paper_towers(tmp_path):
    """vit_b16 is A-CLIP's ViT-B/16 with CLIP's text tower (docs/fidelity.md)."""
    model = compose_config("train", ["model=vit_b16"], tmp_path).model
    assert model.vision.image_size == 224
    assert (model.vision.width, model.vision.depth, model.vision.heads, model.vision.patch_size) == (
        768,
        12,
        12,
        16,
    )
    assert (model.text.width, model.text.heads, model.text.layers, model.text.context_length) == (
        512,
        8,
        12,
        77,
    )
    assert model.embed_dim == 512
    assert OmegaConf.to_container(model.optimizer) == A_CLIP_OPTIMIZER
    assert (model.scheduler.warmup_start_lr, model.scheduler.min_lr) == (1e-6, 1e-5)


def test_masking_group_is_interpolated_into_the_model(train_config):
    cfg = train_config("masking=none")
    assert cfg.model.masking._target_ == cfg.masking._target_


def test_tiny_model_and_data_instantiate(train_config):
    cfg = train_config()
    module = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    assert module.model.vision.grid(32, 32) == (4, 4)
    assert datamodule.batch_size == 8
    assert math.isclose(module.model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


@pytest.mark.parametrize(
    ("devices", "num_nodes", "expected"),
    [(1, 1, 1), (4, 2, 8), ("0,1", 1, 2), ([0, 1, 2], 1, 3), ("2", 3, 6)],
)
def test_world_size(devices, num_nodes, expected):
    assert world_size(OmegaConf.create({"devices": devices, "num_nodes": num_nodes})) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.devices=3"], "divisible by the world size 3"),
        (["trainer.devices=2", "trainer.num_nodes=3", "data.batch_size=8"], "world size 6"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["model.vision.image_size=36"], "multiple of model.vision.patch_size"),
        (["model.optimizer.lr=0"], "model.optimizer.lr must be > 0"),
        (["model.optimizer.weight_decay=-0.1"], "model.optimizer.weight_decay must be >= 0"),
        (["trainer.max_epochs=-1"], "set trainer.max_epochs"),
        (["trainer.accumulate_grad_batches=0"], "accumulate_grad_batches"),
        (["method=aclip", "data.num_views=1"], "data.num_views>=2"),
        (["masking=random", "masking.keep_ratio=0"], r"masking\.keep_ratio must be a number in \(0, 1\]"),
        (["masking=random", "masking.keep_ratio=1.5"], r"masking\.keep_ratio"),
        (["masking=attentive_low", "masking.unit=3"], r"masking\.unit=3 does not fit"),
        (["masking=attentive_low", "masking.layers=[5]"], r"masking\.layers: .* out of range"),
        (["masking=attentive_low", "masking.layers=[99]"], r"masking\.layers: .* out of range"),
        (["masking=attentive_low", "callbacks=none"], "needs the EMA model; add callbacks.ema"),
        (["model.scheduler.min_lr=1"], r"model\.scheduler\.min_lr must be in \[0, lr="),
        (["model.scheduler.warmup_epochs=-1"], r"model\.scheduler\.warmup_epochs must be >= 0"),
        (["model.scheduler.min_lr=low"], r"model\.scheduler\.min_lr must be >= 0 \(a number\), got 'low'"),
        (["model.optimizer.lr=fast"], r"model\.optimizer\.lr must be > 0 \(a number\), got 'fast'"),
        (["model.optimizer.betas=[1.5,0.9]"], r"model\.optimizer: Invalid beta parameter"),
        (["+model.optimizer.lr_decay=1"], r"model\.optimizer: .*unexpected keyword argument 'lr_decay'"),
        (["~model.optimizer._partial_"], r"model\.optimizer needs `_partial_: true`"),
        (
            ["model.optimizer._target_=torch.optim.Nadamw"],
            r"model\.optimizer\._target_='torch\.optim\.Nadamw'",
        ),
        (["model.scheduler._target_=builtins.print"], r"model\.scheduler\._target_='builtins\.print'"),
    ],
)
def test_bad_values_rejected_at_start_up(train_config, monkeypatch, overrides, message):
    def unreachable(*args, **kwargs):
        raise AssertionError("a tower was built before the config was checked")

    monkeypatch.setattr(VisionTower, "__init__", unreachable)
    cfg = train_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.crop_scale=[0.0,1.0]"], "crop_scale"),
        (["data.train.size=0"], "size"),
        (["model.text.context_length=2"], "context_length"),
        (["text_masking=random", "text_masking.length=2"], "context_length must be at least 3"),
        (["model.eval_model=best"], "eval_model"),
    ],
)
def test_bad_component_values_raise_before_training(train_config, overrides, message):
    cfg = train_config(*overrides)
    # Hydra wraps the component's ValueError, keeping its message.
    with pytest.raises(InstantiationException, match=message):
        train(cfg)
