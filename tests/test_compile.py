"""`torch.compile` of the online towers: one graph per tower, no graph break, no recompilation while the
kept-token count stays fixed, the same training.

Counted with torch's own records (`benchmarks.compile_cost.compile_record`: `get_compilation_metrics` and
dynamo's `counters`). What makes the towers recompile: entering evaluation, once per tower, because the
evaluation runs without gradient (torch's reason: "GLOBAL_STATE changed: grad_mode"); its other batch
sizes then share that graph (dynamo marks the batch dimension dynamic on that recompilation). A new
kept-token count (another keep ratio or image size) would add a graph too, as any new shape does.

The default suite traces with the `eager` backend (dynamo alone, seconds); inductor, which generates and
compiles C++ for the CPU (minutes on 2 cores), is `slow`.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from benchmarks.compile_cost import compile_record, compile_towers, reset_compile_records

STEPS = 3


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(outputs["loss"].item())


def train(cfg, module) -> list[float]:
    """`STEPS` training steps of `module` on the config's data, with its EMA callback; the losses."""
    losses = Losses()
    trainer = instantiate(
        cfg.trainer,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        callbacks=[instantiate(cfg.callbacks.ema), losses],
    )
    trainer.fit(module, datamodule=instantiate(cfg.data))
    return losses.values


def build(cfg):
    pl.seed_everything(0, verbose=False)
    return instantiate(cfg.model)


# Two random views in the default suite (the towers' code path with kept tokens); the others are `slow`.
@pytest.mark.parametrize(
    "preset", ["random_2x50", *(pytest.param(p, marks=pytest.mark.slow) for p in ("clip", "aclip_eff"))]
)
def test_towers_compile_whole_and_train_without_recompiling(train_config, preset):
    cfg = train_config(f"method={preset}", "callbacks.model_checkpoint=null")
    expected = train(cfg, build(cfg))
    module = build(cfg)
    compile_towers(module, backend="eager")
    reset_compile_records()

    assert train(cfg, module) == expected  # the eager backend runs the captured graphs themselves
    record = compile_record()
    assert (record.graphs, record.graph_breaks, record.recompiles) == (2, 0, ())

    module.eval()  # entering evaluation: no gradient, evaluation batch sizes
    with torch.no_grad():
        images = torch.rand(5, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
        for batch in (images, images[:3]):
            module.model.encode_image(batch)
            module.model.encode_text(module.tokenizer(["a red circle"] * len(batch)))
    reasons = compile_record().recompiles
    assert len(reasons) == 2 and all("grad_mode" in reason for reason in reasons)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["clip", "random_2x50", "aclip_eff"])
def test_model_compile_trains_with_inductor(train_config, preset):
    """`model.compile=true` (inductor): the same losses as eager to float tolerance, both towers compiled
    whole, at most one recompilation after the first step (none happens)."""
    cfg = train_config(f"method={preset}", "callbacks.model_checkpoint=null")
    expected = train(cfg, build(cfg))
    compiled = train_config(f"method={preset}", "callbacks.model_checkpoint=null", "model.compile=true")
    reset_compile_records()

    losses = train(compiled, build(compiled))

    torch.testing.assert_close(losses, expected, rtol=1e-3, atol=1e-4)
    record = compile_record()
    assert (record.graphs, record.graph_breaks) == (2, 0)
    assert len(record.recompiles) <= 1, record.recompiles
