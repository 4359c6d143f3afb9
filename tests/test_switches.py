"""Memory and speed switches: gradient checkpointing, mixed precision, torch.compile."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from aclip.modules.text import TextTower
from aclip.modules.vision import VisionTower
from aclip.tasks import train
from aclip.trained import load_checkpoint


def _gradients(tower: torch.nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    tower.zero_grad()
    tower(*inputs).square().sum().backward()
    return {name: param.grad.clone() for name, param in tower.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_grad_checkpointing_gives_the_same_gradients(tower):
    torch.manual_seed(0)
    if tower == "vision":
        model = VisionTower(image_size=32, patch_size=8, width=32, depth=2, heads=2, output_dim=16)
        inputs = (torch.randn(3, 3, 32, 32), torch.tensor([[0, 5, 9], [1, 2, 3], [4, 8, 15]]))
    else:
        model = TextTower(context_length=16, vocab_size=100, width=32, heads=2, layers=2, output_dim=16)
        inputs = (torch.randint(1, 99, (3, 16)),)
    expected = _gradients(model, *inputs)
    model.set_grad_checkpointing()
    got = _gradients(model, *inputs)
    assert got.keys() == expected.keys() and len(got) > 10
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_grad_checkpointing_switch_sets_the_online_towers_only(train_config):
    module = instantiate(train_config("model.grad_checkpointing=true").model)
    assert module.model.vision.trunk.grad_checkpointing
    assert module.model.text.transformer.transformer.grad_checkpointing
    assert not module.ema_model.vision.trunk.grad_checkpointing  # the teacher runs without gradients


@pytest.mark.parametrize("switch", ["model.grad_checkpointing=true", "trainer.precision=bf16-mixed"])
def test_fast_dev_run_with_switch(train_config, tmp_path, switch):
    train(
        train_config(
            "debug=fast_dev_run", "evaluation.at_end=false", "callbacks.mask_pictures.every_n_steps=1", switch
        )
    )
    assert json.loads((tmp_path / "run" / "timing.json").read_text())["optimizer_steps"] == 1
    assert list((tmp_path / "run" / "mask_pictures").glob("*.png"))


def test_compile_switch_compiles_the_online_towers_in_place(train_config, tmp_path, monkeypatch):
    """`model.compile=true` compiles both online towers when training starts, in place, so checkpoints keep
    their keys. Only the wiring is tested: compiling on this CPU would take most of a minute."""
    module = instantiate(train_config("model.compile=true").model)
    keys = module.state_dict().keys()
    module.configure_model()  # torch.compile itself waits for the first call
    assert module.model.vision._compiled_call_impl is not None
    assert module.model.text._compiled_call_impl is not None
    assert module.state_dict().keys() == keys

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(type(self)))
    train(train_config("model.compile=true", "trainer.limit_train_batches=1", "evaluation.at_end=false"))
    assert compiled == [VisionTower, TextTower]
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert loaded.hparams.compile and loaded.state_dict().keys() == keys
