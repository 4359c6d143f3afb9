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

import sys
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from aclip.modules.aclip import AClip
from analysis.first_steps import FirstSteps, fit_first_steps, parse_arguments, print_rows
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


class PlateauProbe(FirstSteps):
    """Records the CLIP loss, the towers' spread on a fixed batch and their gradient norms."""

    def __init__(self, images: Tensor, text: Tensor, steps: int, every: int) -> None:
        super().__init__(steps, every)
        self.images, self.text = images, text

    def on_train_start(self, trainer: pl.Trainer, module: AClip) -> None:
        no_step = dict.fromkeys(tower_parts(module), float("nan"))
        self.rows[0] = {"loss": float("nan"), **spread(module, self.images, self.text), **no_step}

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: AClip, optimizer: Any) -> None:
        self.measured |= {name: gradient_norm(ps) for name, ps in tower_parts(module).items()}

    def on_train_batch_end(self, trainer: pl.Trainer, module: AClip, *args: Any) -> None:
        self.measured["loss"] = trainer.callback_metrics["train/clip_loss"].item()
        super().on_train_batch_end(trainer, module, *args)

    def row(self, means: dict[str, float], module: AClip) -> dict[str, float]:
        loss = means.pop("loss")
        return {"loss": loss, **spread(module, self.images, self.text), **means}


def probe(seed: int, steps: int, every: int, overrides: Sequence[str]) -> dict[int, dict[str, float]]:
    """The probe's rows, by optimizer step, for one seed of the run `overrides` configure."""
    cfg = compose_training([f"seed={seed}", "method=clip", *overrides])

    def make_probe() -> PlateauProbe:
        fixed = next(iter(instantiate(cfg.data, num_workers=0).train_dataloader()))  # the first batch
        return PlateauProbe(fixed["images"][:, 0], fixed["text"], steps, every)

    return fit_first_steps(cfg, make_probe).rows


def main(argv: Sequence[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(__doc__, argv)
    return print_rows("analysis.plateau", argv, probe(args.seed, args.steps, args.every, args.overrides))


if __name__ == "__main__":
    main()
