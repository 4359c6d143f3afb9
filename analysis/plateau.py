"""Which tower holds the CLIP loss on its ln(batch) plateau: the first optimizer steps, tower by tower.

An untrained CLIP starts at a loss of ln(batch): it cannot tell the batch's captions apart. On the
built-in glyphs the tiny recipe stayed there for about 130 of its 156 steps (docs/attentive_stability.md,
section 5). This trains the configured run exactly as `train.py` does (the same seeding, config, data,
optimizer and schedule, the schedule of the whole run) and stops it after `--steps` optimizer steps,
recording at every `--every` steps:

- `loss`: the training CLIP loss, averaged over the steps since the last row (`clip_loss` of the run);
- `image cos` and `text cos`: the mean cosine similarity of two different images' (full views, every
  patch) and of two different captions' embeddings on one fixed batch. Near 1, a tower maps every input
  to about the same point, and its side of the logits carries no information;
- `matched`: how much closer an image is to its own caption than to the others of the batch (the mean
  cosine of the matching pairs minus that of all pairs, on the same batch);
- `grad image`, `grad image proj`, `grad text`, `grad text proj`: the gradient norms of the image tower's
  trunk and projection and of the text tower and its projection (the CLIP loss's alone for `method=clip`),
  averaged over the steps since the last row.

    python -m analysis.plateau --set data=glyphs --set eval=[glyphs]             # seed 0, 60 steps
    python -m analysis.plateau --seed 1 --steps 100 --every 20 --set data=glyphs --set eval=[glyphs]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from aclip.modules.aclip import AClip
from analysis.report import command_and_table
from analysis.teacher_at_init import mean_similarity
from benchmarks.variants import compose_training


def tower_parts(module: AClip) -> dict[str, list[nn.Parameter]]:
    """The online model's parameters by part: image trunk and projection, text tower and projection."""
    vision, text = module.model.vision, module.model.text
    text_projection = text.transformer.text_projection
    return {
        "grad image": list(vision.trunk.parameters()),
        "grad image proj": list(vision.proj.parameters()),
        "grad text": [p for p in text.parameters() if p is not text_projection],
        "grad text proj": [text_projection],
    }


def gradient_norm(parameters: Sequence[nn.Parameter]) -> float:
    """The L2 norm of the gradients of `parameters` taken together (those without one count as zero)."""
    grads = [p.grad.detach().flatten() for p in parameters if p.grad is not None]
    return torch.cat(grads).norm().item() if grads else 0.0


def spread(module: AClip, images: Tensor, text: Tensor) -> dict[str, float]:
    """Mean pairwise cosine of the images' and of the captions' embeddings, and the matched pairs' margin,
    as the training step sees the towers (a batch norm uses the batch's statistics), leaving their
    running statistics as they were."""
    model = module.model
    was_training = model.training
    buffers = [buffer.clone() for buffer in model.buffers()]
    model.train()
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(text, normalize=True)
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    model.train(was_training)
    similarity = image_features @ text_features.T
    return {
        "image cos": mean_similarity(image_features),
        "text cos": mean_similarity(text_features),
        "matched": (similarity.diagonal().mean() - similarity.mean()).item(),
    }


class PlateauProbe(pl.Callback):
    """Records the CLIP loss, the towers' spread on a fixed batch and their gradient norms; stops the run
    after `steps` optimizer steps."""

    def __init__(self, images: Tensor, text: Tensor, steps: int, every: int) -> None:
        self.images, self.text, self.steps, self.every = images, text, steps, every
        self.rows: dict[int, dict[str, float]] = {}
        self._window: list[dict[str, float]] = []

    def on_train_start(self, trainer: pl.Trainer, module: AClip) -> None:
        no_step = dict.fromkeys(tower_parts(module), float("nan"))
        self.rows[0] = {"loss": float("nan"), **spread(module, self.images, self.text), **no_step}

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: AClip, optimizer: Any) -> None:
        self._window.append({name: gradient_norm(ps) for name, ps in tower_parts(module).items()})

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: AClip, outputs: Mapping[str, Any], batch: Any, batch_idx: int
    ) -> None:
        self._window[-1]["loss"] = trainer.callback_metrics["train/clip_loss"].item()
        step = trainer.global_step
        if step % self.every == 0 or step >= self.steps:
            window, self._window = self._window, []
            means = {key: sum(row[key] for row in window) / len(window) for key in window[0]}
            grads = {key: value for key, value in means.items() if key != "loss"}
            self.rows[step] = {"loss": means["loss"], **spread(module, self.images, self.text), **grads}
        if step >= self.steps:
            trainer.should_stop = True


def probe(seed: int, steps: int, every: int, overrides: Sequence[str]) -> dict[int, dict[str, float]]:
    """The probe's rows, by optimizer step, for one seed of the run `overrides` configure."""
    cfg = compose_training([f"seed={seed}", "method=clip", *overrides])
    pl.seed_everything(seed, workers=True, verbose=False)
    data = instantiate(cfg.data)
    module: AClip = instantiate(cfg.model)
    fixed = next(iter(instantiate(cfg.data, num_workers=0).train_dataloader()))  # the epoch's first batch
    recorder = PlateauProbe(fixed["images"][:, 0], fixed["text"], steps, every)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=None,
    )
    trainer.fit(module, datamodule=data)
    return recorder.rows


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps to run")
    parser.add_argument("--every", type=int, default=10, help="a row every N steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    rows = probe(args.seed, args.steps, args.every, args.overrides)
    text = command_and_table("analysis.plateau", argv, "step", rows, digits=3)
    print(text)
    return text


if __name__ == "__main__":
    main()
