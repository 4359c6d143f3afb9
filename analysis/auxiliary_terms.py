"""What A-CLIP's self-supervised terms do to the shared image tower in the first steps, term by term.

`method=aclip` adds SimCLR between the two views (weight 1) and BYOL from the online views to the EMA
teacher's view (weight 2) to the CLIP loss (weight 1), all through the same image trunk. This trains the
configured run as `train.py` does (`analysis.first_steps`) and records, every `--every` of its first
`--steps` optimizer steps, averaged over the steps since the last row:

- `clip`, `simclr`, `byol`: each term's value (weighted, as it enters the loss);
- `grad clip`, `grad simclr`, `grad byol`: the norm of each term's own gradient on the image trunk, and
  `cos clip-simclr`, `cos clip-byol`: the cosine between the CLIP term's trunk gradient and each other's
  (below 0: the term pulls the trunk against what the captions ask for);
- `simclr spread`, `byol spread`: the mean pairwise cosine similarity of the heads' outputs over the
  batch (near 1: the head maps every image to about the same point, its loss pushes the trunk apart or
  holds it still).

    python -m analysis.auxiliary_terms                                   # shapes, seed 0, 60 steps
    python -m analysis.auxiliary_terms --seed 1 --steps 80 --every 20 --set data=segments \\
        --set eval=[segments]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aclip.modules.aclip import AClip
from analysis.first_steps import FirstSteps, fit_first_steps, parse_arguments, print_rows
from analysis.teacher_at_init import mean_similarity
from benchmarks.variants import compose_training

HEADS = {"simclr": "view_projector", "byol": "byol_projector"}


def column_group(name: str) -> int:
    """A column's place: the terms, their gradients, the cosines, then the heads' spreads."""
    return (
        3
        if name.endswith(" spread")
        else 1
        if name.startswith("grad ")
        else 2
        if name.startswith("cos ")
        else 0
    )


class TermProbe(FirstSteps):
    """Captures each loss term as the step computes it (forward hooks on the CLIP loss and the
    self-supervision module) and each head's output spread, and takes each term's gradient on the image
    trunk before the step's backward pass."""

    def __init__(self, steps: int, every: int) -> None:
        super().__init__(steps, every)
        self._clip_terms: list[Tensor] = []
        self._auxiliary: Mapping[str, Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, module: AClip) -> None:
        module.clip_loss.register_forward_hook(lambda _, args, output: self._clip_terms.append(output))
        heads = module.self_supervision
        heads.register_forward_hook(lambda _, args, output: setattr(self, "_auxiliary", output))
        for term, name in HEADS.items():
            if hasattr(heads, name):
                getattr(heads, name).register_forward_hook(self._spread_hook(term))

    def _spread_hook(self, term: str) -> Any:
        def record(_: nn.Module, args: Any, output: Tensor) -> None:
            outputs = F.normalize(output.detach().flatten(0, -2), dim=-1)
            self.measured[f"{term} spread"] = mean_similarity(outputs)

        return record

    def row(self, means: dict[str, float], module: AClip) -> dict[str, float]:
        """The terms, their gradients, the cosines, then the heads' spread."""
        return dict(sorted(means.items(), key=lambda item: column_group(item[0])))

    def on_train_batch_start(self, *args: Any) -> None:
        super().on_train_batch_start(*args)
        self._clip_terms, self._auxiliary = [], {}

    def on_before_backward(self, trainer: pl.Trainer, module: AClip, loss: Tensor) -> None:
        trunk = [p for p in module.model.vision.trunk.parameters() if p.requires_grad]
        # The CLIP term as the loss takes it: the mean over views of each view's CLIP loss.
        terms = {"clip": torch.stack(self._clip_terms).mean(), **self._auxiliary}
        grads = {}
        for name, value in terms.items():
            parts = torch.autograd.grad(value, trunk, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat([part.flatten() for part in parts if part is not None])
        self.measured |= {name: value.item() for name, value in terms.items()}
        self.measured |= {f"grad {name}": grad.norm().item() for name, grad in grads.items()}
        self.measured |= {
            f"cos clip-{name}": F.cosine_similarity(grads["clip"], grad, dim=0).item()
            for name, grad in grads.items()
            if name != "clip"
        }


def probe(seed: int, steps: int, every: int, overrides: Sequence[str]) -> dict[int, dict[str, float]]:
    """The probe's rows, by optimizer step, for one seed of `method=aclip` with `overrides`."""
    cfg = compose_training([f"seed={seed}", "method=aclip", *overrides])
    return fit_first_steps(cfg, lambda: TermProbe(steps, every)).rows


def main(argv: Sequence[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(__doc__, argv)
    rows = probe(args.seed, args.steps, args.every, args.overrides)
    return print_rows("analysis.auxiliary_terms", argv, rows)


if __name__ == "__main__":
    main()
