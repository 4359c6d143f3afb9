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
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.progress import track
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from aclip.distributed import rank_and_world
from aclip.evaluation.distributed import gather_in_order
from aclip.evaluation.loaders import EvalLoaders
from aclip.evaluation.tasks import EncodedImages, EvalTask, Tokenizer, ZeroShotClassification
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
        # Sets whose encoding failed (on any rank): left out of the gathers and the scores.
        self.failed: set[int] = set()

    @torch.no_grad()
    def add(
        self, set_index: int, models: Mapping[str, ClipModel], images: Tensor, labels: Tensor | None
    ) -> None:
        """Encode a batch of the set `set_index` with every model."""
        for name, model in models.items():
            self._features[set_index].setdefault(name, []).append(model.encode_image(images, normalize=True))
        if labels is not None:
            self._labels[set_index].append(labels)

    def gathered(self, models: Mapping[str, ClipModel]) -> dict[str, list[EncodedImages | None]]:
        """Per model, every set's `EncodedImages` over all ranks, None for a failed set (a collective:
        every rank calls it)."""
        device = next(iter(models.values())).logit_scale.device
        rank, world = rank_and_world()
        for index, (size, _) in enumerate(self.sets):
            if index in self.failed:
                continue
            seen = sum(len(chunk) for chunk in next(iter(self._features[index].values()), []))
            share = len(range(rank, size, world))
            if seen != share:
                raise RuntimeError(
                    f"image set {index} was encoded for {seen} of this rank's {share} items: an evaluation "
                    "must see whole sets (no limit_val_batches, no sanity check)"
                )
        encoded: dict[str, list[EncodedImages | None]] = {name: [] for name in models}
        for index, (size, labelled) in enumerate(self.sets):
            if index in self.failed:
                for name in models:
                    encoded[name].append(None)
                continue
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

    def check(self) -> None:
        """Open every image set that can check itself (files on disk: `check()`), on rank 0 only: a broken
        evaluation image stops the run before training, not after it."""
        if rank_zero_only.rank != 0:
            return
        for task in self.tasks:
            for dataset in task.image_sets:
                check = getattr(dataset, "check", None)
                if callable(check):
                    check()

    def feature_bank(self) -> FeatureBank:
        """An empty bank for the embeddings of every image set."""
        return FeatureBank(
            [(len(dataset), task.labelled) for task in self.tasks for dataset in task.image_sets]
        )

    def score(
        self,
        models: Mapping[str, ClipModel],
        tokenize: Tokenizer,
        bank: FeatureBank,
        failures: dict[str, str] | None = None,
    ) -> Metrics:
        """Every task's metrics for every model, from the embeddings in `bank` (every rank calls it). A
        task whose images failed to encode, or that fails to score, is left out and named in `failures`."""
        failures = {} if failures is None else failures
        encoded = bank.gathered(models)
        metrics: Metrics = {name: {} for name in models}
        for name, model in models.items():
            sets = iter(encoded[name])
            for task in self.tasks:
                images = [next(sets) for _ in task.image_sets]
                key = f"{task.kind}/{task.name}"
                if key in failures or any(image is None for image in images):
                    continue
                try:
                    results = task.score(model, tokenize, images)
                except Exception as error:  # the other tasks are still reported
                    failures[key] = f"{type(error).__name__}: {error}"
                    continue
                metrics[name] |= {f"{key}/{metric}": value for metric, value in results.items()}
            metrics[name] |= self._suite_average(metrics[name])
        return metrics

    def _suite_average(self, metrics: dict[str, float]) -> dict[str, float]:
        """`zeroshot/average/reported`: the mean of the zero-shot sets' reported figures (the "Average"
        column of the paper's 26-set table), when there are several and none failed."""
        sets = [f"zeroshot/{task.name}/reported" for task in self.tasks if task.kind == "zeroshot"]
        if len(sets) < 2 or not all(key in metrics for key in sets):
            return {}
        return {"zeroshot/average/reported": sum(metrics[key] for key in sets) / len(sets)}

    def reported_metrics(self) -> dict[str, str]:
        """Which figure each zero-shot set's `reported` is, by `zeroshot/<set>`."""
        return {
            f"{task.kind}/{task.name}": task.reported_metric
            for task in self.tasks
            if isinstance(task, ZeroShotClassification)
        }

    def chance_levels(self) -> dict[str, float]:
        """What a model guessing at random scores (percent) on each zero-shot set: top-k is k of the set's
        classes, mean per-class recall one of them."""
        levels = {}
        for task in self.tasks:
            if isinstance(task, ZeroShotClassification):
                classes, key = len(task.classnames), f"{task.kind}/{task.name}"
                levels |= {f"{key}/top{k}": 100.0 * k / classes for k in (1, 5) if k <= classes}
                levels[f"{key}/mean_per_class_recall"] = 100.0 / classes
        return levels

    @torch.no_grad()
    def run(self, models: Mapping[str, ClipModel], tokenize: Tokenizer) -> Metrics:
        """Encode every image set once for all `models` (in eval mode), then score every task.

        Raises:
            EvaluationError: some tasks failed (an unreadable image, say); it carries the other tasks'
                metrics, so that they can still be reported.
        """
        modes = {name: model.training for name, model in models.items()}
        for model in models.values():
            model.eval()
        try:
            bank, failures = self.feature_bank(), {}
            device = next(iter(models.values())).logit_scale.device
            sets = [(task, dataset) for task in self.tasks for dataset in task.image_sets]
            for index, (task, dataset) in enumerate(sets):
                key = f"{task.kind}/{task.name}"
                description = f"{key}: {len(dataset)} images"
                log.info("Evaluating %s (image set %d of %d)", description, index + 1, len(sets))
                try:
                    for batch in progress(self.loaders(dataset), description):
                        images, labels = split_batch(batch)
                        bank.add(index, models, images.to(device), labels)
                except Exception as error:  # the other sets are still evaluated
                    failures[key] = f"{type(error).__name__}: {error}"
                if _failed_on_any_rank(key in failures, device):
                    bank.failed.add(index)
                    failures.setdefault(key, "failed on another rank")
            metrics = self.score(models, tokenize, bank, failures)
        finally:
            for name, model in models.items():
                model.train(modes[name])
        if failures:
            raise EvaluationError(metrics, failures)
        return metrics


class EvaluationError(RuntimeError):
    """Evaluation tasks that failed, by `<kind>/<name>`, with the metrics of those that did not."""

    def __init__(self, metrics: Metrics, failures: dict[str, str]) -> None:
        lines = "\n  ".join(f"{key}: {reason}" for key, reason in failures.items())
        super().__init__(f"{len(failures)} evaluation task(s) failed:\n  {lines}")
        self.metrics, self.failures = metrics, failures


def _failed_on_any_rank(failed: bool, device: torch.device) -> bool:
    """Whether any rank failed (every rank calls it, so that all skip the same sets)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return failed
    flag = torch.tensor([float(failed)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def evaluate(
    model: ClipModel, tasks: Sequence[EvalTask], tokenize: Tokenizer, loaders: EvalLoaders
) -> dict[str, float]:
    """One model's metrics on `tasks`; keys are `<kind>/<name>/<metric>`, e.g. `zeroshot/imagenet/top1`."""
    return Evaluation(tasks, loaders).run({"model": model}, tokenize)["model"]
