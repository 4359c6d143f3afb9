"""Downstream evaluation tasks of a CLIP model: zero-shot classification, retrieval and linear probes.

Each task is built from the `eval` config group (one node per set) and reports a dict of percentages.
Under torch.distributed every rank encodes its share of the images and texts and the results are
gathered in item order, so the figures equal those of a single process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from aclip.evaluation.distributed import gather_in_order, my_share
from aclip.evaluation.linear_probe import fit_linear_probe
from aclip.evaluation.loaders import EvalLoaders
from aclip.evaluation.prompts import load_classnames, load_templates
from aclip.modules.metrics import retrieval_recall, zero_shot_weights
from aclip.modules.model import ClipModel

Tokenizer = Callable[[list[str]], Tensor]


@torch.no_grad()
def encode_texts(
    model: ClipModel, tokenize: Tokenizer, texts: Sequence[str], batch_size: int = 512
) -> Tensor:
    """Normalised text embeddings of `texts` [N, D], each rank encoding its share."""
    device = model.logit_scale.device
    share = list(my_share(texts))
    chunks = [
        model.encode_text(tokenize(share[i : i + batch_size]).to(device))
        for i in range(0, len(share), batch_size)
    ]
    local = torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim, device=device)
    return gather_in_order(local, len(texts))


@torch.no_grad()
def encode_images(model: ClipModel, dataset: Dataset, loaders: EvalLoaders) -> tuple[Tensor, Tensor | None]:
    """Normalised image embeddings [N, D] of every item of `dataset`, and its labels [N] if it has any."""
    device = model.logit_scale.device
    features, labels = [], []
    for batch in loaders(dataset):
        images, *rest = batch if isinstance(batch, list | tuple) else (batch,)
        features.append(model.encode_image(images.to(device)))
        labels += [rest[0].to(device)] if rest else []
    local = torch.cat(features) if features else torch.empty(0, model.embed_dim, device=device)
    gathered_labels = gather_in_order(torch.cat(labels), len(dataset)) if labels else None
    return gather_in_order(local, len(dataset)), gathered_labels


class ClassificationMetrics:
    """Top-1 and top-5 accuracy and mean per-class recall (percent), synchronised across ranks."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.top_k = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device)
            for k in (1, 5)
            if k <= num_classes
        }
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        for metric in self.top_k.values():
            metric.update(logits, labels)
        self.confusion.update(logits.argmax(dim=1), labels)

    def compute(self) -> dict[str, float]:
        results = {name: 100.0 * metric.compute().item() for name, metric in self.top_k.items()}
        confusion = self.confusion.compute()
        support = confusion.sum(dim=1)
        # Classes absent from the evaluation set have no recall; they are left out of the mean.
        recall = confusion.diagonal()[support > 0] / support[support > 0]
        results["mean_per_class_recall"] = 100.0 * recall.mean().item()
        return results


class EvalTask(ABC):
    """One downstream evaluation; its metrics are reported as `<kind>/<name>/<metric>`."""

    kind: ClassVar[str]

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def evaluate(self, model: ClipModel, tokenize: Tokenizer, loaders: EvalLoaders) -> dict[str, float]:
        """The task's metrics (percent) for `model`."""


class ZeroShotClassification(EvalTask):
    """Classify images by their similarity to prompt-ensembled class names (CLIP's zero-shot transfer).

    Args:
        dataset: items `(PIL image, label)`.
        classnames: see `aclip.evaluation.prompts.load_classnames` (default: from the dataset).
        templates: see `aclip.evaluation.prompts.load_templates` (default: from the dataset).
        name: the set's name in the metric keys.
    """

    kind = "zeroshot"

    def __init__(
        self,
        dataset: Dataset,
        classnames: str | Sequence[str] | None = None,
        templates: str | Sequence[str] | None = None,
        name: str = "zeroshot",
    ) -> None:
        super().__init__(name)
        self.dataset = dataset
        self.classnames = load_classnames(classnames, dataset)
        self.templates = load_templates(templates, dataset)

    @torch.no_grad()
    def evaluate(self, model: ClipModel, tokenize: Tokenizer, loaders: EvalLoaders) -> dict[str, float]:
        device = model.logit_scale.device
        weights = zero_shot_weights(
            lambda texts: encode_texts(model, tokenize, texts), self.classnames, self.templates
        )
        metrics = ClassificationMetrics(len(self.classnames), device)
        for images, labels in loaders(self.dataset):
            metrics.update(model.encode_image(images.to(device)) @ weights, labels.to(device))
        return metrics.compute()


class Retrieval(EvalTask):
    """Retrieve captions from images and images from captions, every caption of an image counting.

    Args:
        dataset: items are PIL images; `dataset.captions[i]` lists the captions of image i.
        name: the set's name in the metric keys.
    """

    kind = "retrieval"

    def __init__(self, dataset: Dataset, name: str = "retrieval") -> None:
        super().__init__(name)
        self.dataset = dataset

    @torch.no_grad()
    def evaluate(self, model: ClipModel, tokenize: Tokenizer, loaders: EvalLoaders) -> dict[str, float]:
        captions: Sequence[Sequence[str]] = self.dataset.captions
        image_features, _ = encode_images(model, self.dataset, loaders)
        texts = [caption for per_image in captions for caption in per_image]
        text_to_image = torch.cat(
            [torch.full((len(per_image),), index) for index, per_image in enumerate(captions)]
        )
        return retrieval_recall(image_features, encode_texts(model, tokenize, texts), text_to_image)


class LinearProbe(EvalTask):
    """Logistic regression on frozen image embeddings (see `aclip.evaluation.linear_probe`).

    Args:
        train, test: items `(PIL image, label)` over the same classes (e.g. two ImageFolder splits).
        weight_decays: L2 strengths tried; the best on a held-out part of `train` is refitted on all of it.
        val_fraction: share of `train` held out to choose the weight decay.
        max_iter: L-BFGS iterations per fit.
        seed: seeds the held-out split.
        name: the set's name in the metric keys.
    """

    kind = "linear_probe"

    def __init__(
        self,
        train: Dataset,
        test: Dataset,
        weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        val_fraction: float = 0.2,
        max_iter: int = 1000,
        seed: int = 0,
        name: str = "linear_probe",
    ) -> None:
        super().__init__(name)
        if not weight_decays or not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"eval.{name}: need at least one weight decay and 0 < val_fraction < 1, got "
                f"{list(weight_decays)} and {val_fraction}"
            )
        self.train, self.test = train, test
        self.weight_decays, self.val_fraction = tuple(weight_decays), val_fraction
        self.max_iter, self.seed = max_iter, seed

    @torch.no_grad()
    def evaluate(self, model: ClipModel, tokenize: Tokenizer, loaders: EvalLoaders) -> dict[str, float]:
        train_features, train_labels = encode_images(model, self.train, loaders)
        test_features, test_labels = encode_images(model, self.test, loaders)
        if train_labels is None or test_labels is None:
            raise ValueError(f"eval.{self.name}: the linear probe needs labelled (image, label) items")
        num_classes = (
            len(getattr(self.train, "classes", ())) or int(max(train_labels.max(), test_labels.max())) + 1
        )
        classifier = fit_linear_probe(
            train_features,
            train_labels,
            num_classes,
            self.weight_decays,
            self.val_fraction,
            self.max_iter,
            self.seed,
        )
        # Every rank holds the same classifier; each scores its share of the test set.
        share = torch.as_tensor(list(my_share(range(len(test_labels)))), dtype=torch.long)
        metrics = ClassificationMetrics(num_classes, test_features.device)
        metrics.update(classifier(test_features[share]), test_labels[share])
        return metrics.compute()


def evaluate(
    model: ClipModel, tasks: Iterable[EvalTask], tokenize: Tokenizer, loaders: EvalLoaders
) -> dict[str, float]:
    """Run every task in eval mode; keys are `<kind>/<name>/<metric>`, e.g. `zeroshot/imagenet/top1`."""
    was_training = model.training
    model.eval()
    metrics = {}
    try:
        for task in tasks:
            results = task.evaluate(model, tokenize, loaders)
            metrics.update({f"{task.kind}/{task.name}/{key}": value for key, value in results.items()})
    finally:
        model.train(was_training)
    return metrics
