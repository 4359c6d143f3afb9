"""The evaluation suite: every task of the `eval` group, its image sets encoded once for all models.

The same suite serves the evaluation after training (`Evaluation.run`, also `evaluate.py`) and the
learning curves during training (Lightning's validation loop: `AClip.validation_step` fills a
`FeatureBank` from `Evaluation.dataloaders()` and `Evaluation.score` turns it into metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.progress import track
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from aclip.distributed import rank_and_world
from aclip.evaluation.distributed import gather_in_order
from aclip.evaluation.loaders import EvalLoaders
from aclip.evaluation.tasks import EncodedImages, EvalTask, Tokenizer
from aclip.modules.model import ClipModel

log = logging.getLogger(__name__)

# {model name: {"<kind>/<set>/<metric>": percent}}
Metrics = dict[str, dict[str, float]]


def progress(loader: DataLoader, description: str) -> Iterable[Any]:
    """`loader`'s batches, with a progress bar on rank 0 when the output is a terminal."""
    console = Console(stderr=True)
    hidden = rank_and_world()[0] != 0 or not console.is_terminal
    return track(
        loader, description=description, total=len(loader), transient=True, console=console, disable=hidden
    )


def split_batch(batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """(images, labels or None) of a batch of an evaluation loader."""
    images, *rest = batch if isinstance(batch, list | tuple) else (batch,)
    return images, (rest[0] if rest else None)


class FeatureBank:
    """This rank's embeddings of its share of each image set, for every model, gathered in item order.

    `sets` holds (size, labelled) per image set: labelled sets also gather their labels.
    """

    def __init__(self, sets: Sequence[tuple[int, bool]]) -> None:
        self.sets = list(sets)
        self._features: list[dict[str, list[Tensor]]] = [{} for _ in self.sets]
        self._labels: list[list[Tensor]] = [[] for _ in self.sets]

    @torch.no_grad()
    def add(
        self, set_index: int, models: Mapping[str, ClipModel], images: Tensor, labels: Tensor | None
    ) -> None:
        """Encode a batch of the set `set_index` with every model."""
        for name, model in models.items():
            self._features[set_index].setdefault(name, []).append(model.encode_image(images))
        if labels is not None:
            self._labels[set_index].append(labels)

    def gathered(self, models: Mapping[str, ClipModel]) -> dict[str, list[EncodedImages]]:
        """Per model, every set's `EncodedImages` over all ranks (a collective: every rank calls it)."""
        device = next(iter(models.values())).logit_scale.device
        rank, world = rank_and_world()
        for index, (size, _) in enumerate(self.sets):
            seen = sum(len(chunk) for chunk in next(iter(self._features[index].values()), []))
            share = len(range(rank, size, world))
            if seen != share:
                raise RuntimeError(
                    f"image set {index} was encoded for {seen} of this rank's {share} items: an evaluation "
                    "must see whole sets (no limit_val_batches, no sanity check)"
                )
        encoded: dict[str, list[EncodedImages]] = {name: [] for name in models}
        for index, (size, labelled) in enumerate(self.sets):
            labels = None
            if labelled:
                # A rank whose share of a small set is empty still takes part in the gathers.
                local = self._labels[index]
                local = (
                    torch.cat(local).to(device) if local else torch.empty(0, dtype=torch.long, device=device)
                )
                labels = gather_in_order(local, size)
            for name, model in models.items():
                chunks = self._features[index].get(name, [])
                local = torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim, device=device)
                encoded[name].append(EncodedImages(gather_in_order(local, size), labels))
        return encoded


class Evaluation:
    """The tasks of the `eval` group and how their images are loaded.

    Args:
        tasks: the evaluation tasks (`aclip.tasks.build_eval_tasks`).
        loaders: makes the dataloader over this rank's share of an image set.
    """

    def __init__(self, tasks: Sequence[EvalTask], loaders: EvalLoaders) -> None:
        self.tasks, self.loaders = list(tasks), loaders

    @property
    def image_sets(self) -> list[Dataset]:
        """Every task's image sets, in task order."""
        return [dataset for task in self.tasks for dataset in task.image_sets]

    def dataloaders(self) -> list[DataLoader]:
        """One loader per image set over this rank's share: Lightning's validation dataloaders."""
        return [self.loaders(dataset) for dataset in self.image_sets]

    def feature_bank(self) -> FeatureBank:
        """An empty bank for the embeddings of every image set."""
        return FeatureBank(
            [(len(dataset), task.labelled) for task in self.tasks for dataset in task.image_sets]
        )

    def score(self, models: Mapping[str, ClipModel], tokenize: Tokenizer, bank: FeatureBank) -> Metrics:
        """Every task's metrics for every model, from the embeddings in `bank` (every rank calls it)."""
        encoded = bank.gathered(models)
        metrics: Metrics = {name: {} for name in models}
        for name, model in models.items():
            sets = iter(encoded[name])
            for task in self.tasks:
                images = [next(sets) for _ in task.image_sets]
                results = task.score(model, tokenize, images)
                metrics[name] |= {f"{task.kind}/{task.name}/{key}": value for key, value in results.items()}
        return metrics

    @torch.no_grad()
    def run(self, models: Mapping[str, ClipModel], tokenize: Tokenizer) -> Metrics:
        """Encode every image set once for all `models` (in eval mode), then score every task."""
        modes = {name: model.training for name, model in models.items()}
        for model in models.values():
            model.eval()
        try:
            bank = self.feature_bank()
            device = next(iter(models.values())).logit_scale.device
            sets = [(task, dataset) for task in self.tasks for dataset in task.image_sets]
            for index, (task, dataset) in enumerate(sets):
                description = f"{task.kind}/{task.name}: {len(dataset)} images"
                log.info("Evaluating %s (image set %d of %d)", description, index + 1, len(sets))
                for batch in progress(self.loaders(dataset), description):
                    images, labels = split_batch(batch)
                    bank.add(index, models, images.to(device), labels)
            return self.score(models, tokenize, bank)
        finally:
            for name, model in models.items():
                model.train(modes[name])


def evaluate(
    model: ClipModel, tasks: Sequence[EvalTask], tokenize: Tokenizer, loaders: EvalLoaders
) -> dict[str, float]:
    """One model's metrics on `tasks`; keys are `<kind>/<name>/<metric>`, e.g. `zeroshot/imagenet/top1`."""
    return Evaluation(tasks, loaders).run({"model": model}, tokenize)["model"]
