"""The whole training step of every method preset on a CUDA device, traced on a CPU with fake tensors.

Under torch's `FakeTensorMode` a tensor carries a device, a dtype and a shape but no memory, so the module
and the batch can sit on a "cuda" device of a machine without one. Every op checks its inputs' devices as
CUDA would (a CPU tensor mixed with CUDA ones raises `FakeTensorDeviceMismatchError`), and `CpuTensorWatch`
fails the trace on any tensor the step creates on the CPU at all: one that is only indexed with or read back
passes the device check, but costs a host-to-device copy and a synchronisation on a GPU.

Traced per preset: `AClip.training_step` (EMA pass and patch scores, the masking policy with its generator,
both towers, the losses, the object metrics), its backward pass, the fused AdamW step and the logit-scale
clamp, and the EMA update of every (EMA, online) pair. Once: the validation steps filling the evaluation's
`FeatureBank`, its gathered features, and the export's state dict.

What cannot run under fake tensors, each behind one seam:
- `torch.Generator(device="cuda")` calls the driver. `aclip.modules.masking.generator_on`, the one place
  the step makes its generator, is replaced by one that records the device asked for and returns a CPU
  generator (fake tensors take a generator of any device).
- The autograd engine runs CUDA gradients on a device thread it cannot start without a driver
  (pytorch/pytorch#92627). `backward_in_this_thread` runs the same backward nodes in this thread, as the
  engine would: gradients summed per input, reduced to the input's shape, checked for its device.
- A policy's loop whose length depends on its draws (`BlockwiseMasking` places blocks until every sample's
  budget is met) reads a flag on the host, which fake tensors do not hold: `aclip.modules.masking.any_left`,
  the one such read, is replaced by one that runs three rounds.
- Lightning's loop: the step is called directly, with a `Trainer(barebones=True)` attached (it turns
  `self.log` into a no-op; the logged values are still computed).
- Autocast: `torch.autocast("cuda")` switches itself off without a driver, so the trace is float32; bf16
  runs on the CPU's autocast in tests/test_bf16.py.
Fake kernels check devices and shapes, not whether a kernel exists for a dtype on a device (torch's uint8
antialiased bicubic resize exists on the CPU only): those cases are `gpu` tests (BENCHMARKS.md, "GPU: what
is proven on a CPU"). `test_training_step_on_cuda` runs the same step on a real GPU.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import aclip.modules.aclip
from aclip.callbacks.ema import ema_update
from aclip.export import open_clip_state_dict
from aclip.modules.aclip import AClip
from aclip.tasks import build_evaluation
from benchmarks.variants import attach_barebones_trainer
from tests.helpers import CONF_DIR

CUDA = torch.device("cuda", 0)
PRESETS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
TEXT_REDUCTIONS = sorted(path.stem for path in (CONF_DIR / "text_masking").glob("*.yaml"))
# One preset per code path of the step (the others differ from these in numbers only: views, keep ratio,
# layers, mask unit, teacher resolution): the presets of the GPU run.
PATHS = ("clip", "random_2x50", "aclip", "attentive_mixed", "clipa_grid", "clipa_block", "clipa_resize")
# A-CLIP's heads as the paper presets train them: batch norms, SyncBatchNorm under DDP (trainer=ddp).
PAPER_HEADS = [
    "model.self_supervision.norm=batch",
    "model.self_supervision.activation=relu",
    "model.self_supervision.view_head_bias=true",
    "model.self_supervision.byol_head_bias=false",
]


class CpuTensorWatch(TorchDispatchMode):
    """Records every op that returns a tensor on the CPU, with the line of this project that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_tensors: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, Tensor) and t.device.type == "cpu" for t in tree_leaves(out)):
            ours = [f for f in traceback.extract_stack() if "/aclip/" in f.filename]
            where = f"{ours[-1].filename}:{ours[-1].lineno} {ours[-1].line}" if ours else "outside aclip"
            self.cpu_tensors.append(f"{func} at {where}")
        return out


def backward_in_this_thread(loss: Tensor) -> None:
    """`loss.backward()` without the autograd engine's device threads: every node of the graph, in
    topological order, called on the sum of the gradients its outputs received."""
    order, seen, stack = [], set(), [(loss.grad_fn, False)]
    while stack:  # iterative depth-first search: post-order, reversed below
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions if child is not None)
    gradients: dict[Any, list[Tensor | None]] = {loss.grad_fn: [torch.ones_like(loss)]}
    for node in reversed(order):
        inputs = gradients.pop(node, None)
        if inputs is None:
            continue
        outputs = node(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for (child, index), grad in zip(node.next_functions, outputs, strict=True):
            if child is None or grad is None:
                continue
            expected = child._input_metadata[index]
            if grad.device != expected.device:
                raise RuntimeError(f"{node.name()} gives {child.name()} a gradient on {grad.device}")
            grad = grad.sum_to_size(expected.shape).to(expected.dtype)  # what the engine's checks do
            slots = gradients.setdefault(child, [None] * len(child._input_metadata))
            slots[index] = grad if slots[index] is None else slots[index] + grad


@contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.device]]:
    """Fake tensors, with the generator and host-read seams replaced; yields the devices the step asked
    generators for."""
    requested: list[torch.device] = []

    def generator_on(device: torch.device) -> torch.Generator:
        requested.append(torch.device(device))
        return torch.Generator()

    rounds = iter([True] * 3)
    monkeypatch.setattr(aclip.modules.aclip, "generator_on", generator_on)
    monkeypatch.setattr(aclip.modules.masking, "any_left", lambda flags: next(rounds, False))
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield requested


def to_device(value: Any, device: torch.device) -> Any:
    """A batch (a mapping, sequence or tensor) with its tensors on `device`."""
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_device(item, device) for item in value]
    return value.to(device) if isinstance(value, Tensor) else value


def build(train_config, preset: str, *overrides: str) -> tuple[AClip, dict[str, Any], Any]:
    """The preset's tiny module (A-CLIP's presets with the paper's batch-norm heads, made SyncBatchNorm as
    trainer=ddp makes them), a training batch from its datamodule, and its config."""
    heads = PAPER_HEADS if preset.startswith("aclip") else []
    cfg = train_config(f"method={preset}", *heads, *overrides)
    pl.seed_everything(0, verbose=False)
    module = nn.SyncBatchNorm.convert_sync_batchnorm(instantiate(cfg.model))
    batch = next(iter(instantiate(cfg.data).train_dataloader()))
    return module, batch, cfg


def optimizer_step(
    module: AClip,
    batch: Mapping[str, Any],
    backward: Callable[[Tensor], None],
    watch: CpuTensorWatch,
    precision: MixedPrecision | None = None,
) -> dict[str, Any]:
    """One optimizer step as Lightning runs it (training_step in the `precision` plugin's autocast,
    backward, AdamW, the logit-scale clamp and the EMA update), under `watch`; training_step's outputs."""
    attach_barebones_trainer(module)
    optimizer = module.trainer.optimizers[0]
    with watch:
        with precision.forward_context() if precision else nullcontext():
            outputs = module.training_step(batch, 0)
        backward(outputs["loss"])
        optimizer.step()
        module.model.clamp_logit_scale()
        for ema, online in module.ema_pairs():
            ema_update(ema, online, momentum=0.99)
    return outputs


def check_step(module: AClip, outputs: dict[str, Any], watch: CpuTensorWatch, device: torch.device) -> None:
    assert not watch.cpu_tensors, "tensors created on the CPU inside the step:\n" + "\n".join(
        watch.cpu_tensors
    )
    tensors = [outputs["loss"], outputs["keep"], outputs["views"]]
    assert all(t.device == device for t in tensors if t is not None)
    assert outputs["score_map"] is None or outputs["score_map"].device == device
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert {p.grad.device for p in module.parameters() if p.grad is not None} == {device}
    assert {t.device for t in module.ema_model.state_dict().values()} == {device}


@pytest.mark.parametrize("preset", PRESETS)  # about 1.5 s each
def test_training_step_on_fake_cuda(train_config, monkeypatch, preset):
    module, batch, _ = build(train_config, preset)
    watch = CpuTensorWatch()
    with fake_cuda(monkeypatch) as generators:
        module.to(CUDA)
        outputs = optimizer_step(module, to_device(batch, CUDA), backward_in_this_thread, watch)
        check_step(module, outputs, watch, CUDA)
    assert "object_masks" in batch  # the object metrics were traced too
    assert generators == [CUDA]  # the masking policy's generator is made for the module's device
    if preset.startswith("aclip"):
        assert any(isinstance(m, nn.SyncBatchNorm) for m in module.self_supervision.modules())


# The reductions differ on the CPU (tokenisation) only; on the device each is a shorter caption: one in
# the default suite.
@pytest.mark.parametrize(
    "reduction", [r if r == "block" else pytest.param(r, marks=pytest.mark.slow) for r in TEXT_REDUCTIONS]
)
def test_text_reductions_on_fake_cuda(train_config, monkeypatch, reduction):
    if reduction == "syntax":
        pytest.importorskip("nltk")
    module, batch, _ = build(train_config, "clip", f"text_masking={reduction}", "text_masking.length=8")
    assert batch["text"].shape[1] == 8  # shorter captions than the tower's context
    watch = CpuTensorWatch()
    with fake_cuda(monkeypatch):
        module.to(CUDA)
        outputs = optimizer_step(module, to_device(batch, CUDA), backward_in_this_thread, watch)
        check_step(module, outputs, watch, CUDA)


def test_validation_feature_bank_and_export_on_fake_cuda(train_config, monkeypatch):
    # A tower open_clip can express (the tiny default's convolutional stem is refused by the export).
    module, _, cfg = build(train_config, "aclip", "model.vision.stem=patch")
    evaluation = build_evaluation(cfg)
    batches = [(index, batch) for index, loader in enumerate(evaluation.dataloaders()) for batch in loader]
    watch = CpuTensorWatch()
    with fake_cuda(monkeypatch):
        module.to(CUDA)
        module.eval()
        bank = evaluation.feature_bank()
        module._validation_features = bank  # what on_validation_epoch_start sets from the datamodule
        with watch:
            for index, batch in batches:
                module.validation_step(to_device(batch, CUDA), 0, index)
            gathered = bank.gathered(module.eval_models())
        exported = open_clip_state_dict(module.ema_model)
    assert not watch.cpu_tensors, "\n".join(watch.cpu_tensors)
    sets = [encoded for per_model in gathered.values() for encoded in per_model]
    assert len(sets) == 2 * len(evaluation.image_sets)
    assert all(encoded.features.device == CUDA for encoded in sets)
    assert [len(encoded.features) for encoded in gathered["ema"]] == [
        len(dataset) for dataset in evaluation.image_sets
    ]
    labelled = [encoded.labels for encoded in sets if encoded.labels is not None]
    assert labelled and all(labels.device == CUDA for labels in labelled)
    # The export copies to the host (safetensors writes CPU tensors), after the folding on the device.
    assert {t.device.type for t in exported.values()} == {"cpu"}


def test_the_watch_catches_a_cpu_tensor_that_meets_no_cuda_tensor(monkeypatch):
    """The detector itself: a tensor made on the CPU and only read back passes every device check."""
    watch = CpuTensorWatch()
    with fake_cuda(monkeypatch):
        x = torch.ones(4, device=CUDA)
        with watch:
            y = x * 2
            positions = torch.arange(4)  # never meets a CUDA tensor
        assert y.device == CUDA and positions.device.type == "cpu"
    assert len(watch.cpu_tensors) == 1 and "arange" in watch.cpu_tensors[0]


def test_the_backward_walk_gives_the_engines_gradients():
    """`backward_in_this_thread` against `Tensor.backward`, on real CPU tensors (broadcast, reuse, views)."""
    torch.manual_seed(0)
    weight, bias, scale = torch.randn(5, 3), torch.randn(3), torch.tensor(1.5)
    x = torch.randn(4, 5)

    def loss(w, b, s):
        hidden = (x @ w + b).relu()
        return (s * hidden).sum() + hidden[:, :2].square().mean() + (w * w).sum()

    leaves = [t.clone().requires_grad_() for t in (weight, bias, scale)]
    loss(*leaves).backward()
    walked = [t.clone().requires_grad_() for t in (weight, bias, scale)]
    backward_in_this_thread(loss(*walked))
    for expected, got in zip(leaves, walked, strict=True):
        torch.testing.assert_close(got.grad, expected.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("preset", "checkpointing"), [*((p, False) for p in PATHS), ("aclip", True)])
def test_training_step_on_cuda(train_config, tmp_path: Path, preset, checkpointing):
    """The same step on a real GPU, in bf16 autocast as Lightning's bf16-mixed runs it: no tensor made on
    the CPU, no host synchronisation, finite loss (with activation checkpointing, which saves and restores
    the CUDA random state)."""
    module, batch, _ = build(train_config, preset, f"model.grad_checkpointing={str(checkpointing).lower()}")
    module.to(CUDA)
    batch, watch = to_device(batch, CUDA), CpuTensorWatch()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = optimizer_step(module, batch, Tensor.backward, watch, MixedPrecision("bf16-mixed", "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_step(module, outputs, watch, CUDA)
    assert torch.isfinite(outputs["loss"]).item()
