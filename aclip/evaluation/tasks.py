"""Downstream evaluation tasks of a CLIP model: zero-shot classification, retrieval and linear probes.

Each task is built from the `eval` config group (one node per set). A task names the image sets whose
embeddings it needs (`image_sets`) and turns their embeddings into a dict of percentages (`score`); the
images are encoded elsewhere, once for every evaluated model (`aclip.evaluation.suite`), by the
evaluation after training and by Lightning's validation loop during it. Under torch.distributed every
rank encodes its share of the images and texts and the results are gathered in item order, so the
figures equal those of a single process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassConfusionMatrix

from aclip.evaluation.distributed import gather_in_order, my_share
from aclip.evaluation.linear_probe import fit_linear_probe
from aclip.evaluation.prompts import load_classnames, load_templates
from aclip.modules.metrics import retrieval_recall, zero_shot_weights
from aclip.modules.model import ClipModel

Tokenizer = Callable[[list[str]], Tensor]


class EncodedImages(NamedTuple):
    """The normalised embeddings [N, D] of every item of an image set, and its labels [N] if it has any."""

    features: Tensor
    labels: Tensor | None


@torch.no_grad()
def encode_texts(
    model: ClipModel, tokenize: Tokenizer, texts: Sequence[str], batch_size: int = 512
) -> Tensor:
    """Normalised text embeddings of `texts` [N, D], each rank encoding its share."""
    device = model.logit_scale.device
    share = list(my_share(texts))
    chunks = [
        model.encode_text(tokenize(share[i : i + batch_size]).to(device), normalize=True)
        for i in range(0, len(share), batch_size)
    ]
    local = torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim, device=device)
    return gather_in_order(local, len(texts))


class ClassificationMetrics:
    """Top-1 and top-5 accuracy and mean per-class recall (percent) of logits over a whole set.

    Every rank holds the whole set (gathered), so nothing is synchronised across ranks.
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.top_k = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro", sync_on_compute=False)
            for k in (1, 5)
            if k <= num_classes
        }
        self.confusion = MulticlassConfusionMatrix(num_classes, sync_on_compute=False)
        for metric in (*self.top_k.values(), self.confusion):
            metric.to(device)

    def __call__(self, logits: Tensor, labels: Tensor) -> dict[str, float]:
        results = {name: 100.0 * metric(logits, labels).item() for name, metric in self.top_k.items()}
        confusion = self.confusion(logits.argmax(dim=1), labels)
        support = confusion.sum(dim=1)
        # Classes absent from the evaluation set have no recall; they are left out of the mean.
        recall = confusion.diagonal()[support > 0] / support[support > 0]
        results["mean_per_class_recall"] = 100.0 * recall.mean().item()
        return results


class EvalTask(ABC):
    """One downstream evaluation; its metrics are reported as `<kind>/<name>/<metric>`."""

    kind: ClassVar[str]
    # Whether the image sets' items are (image, label) pairs rather than images.
    labelled: ClassVar[bool] = True

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    @abstractmethod
    def image_sets(self) -> list[Dataset]:
        """The image datasets whose embeddings `score` takes, in its order."""

    @abstractmethod
    def score(
        self, model: ClipModel, tokenize: Tokenizer, images: Sequence[EncodedImages]
    ) -> dict[str, float]:
        """The task's metrics (percent) for `model`, from the embeddings of its `image_sets`."""


class OneImageSetTask(EvalTask):
    """A task over one image set, `dataset`: subclasses score its embeddings in `score_set`."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        super().__init__(name)
        self.dataset = dataset

    @property
    def image_sets(self) -> list[Dataset]:
        return [self.dataset]

    @torch.no_grad()
    def score(
        self, model: ClipModel, tokenize: Tokenizer, images: Sequence[EncodedImages]
    ) -> dict[str, float]:
        (encoded,) = images
        return self.score_set(model, tokenize, encoded)

    @abstractmethod
    def score_set(self, model: ClipModel, tokenize: Tokenizer, encoded: EncodedImages) -> dict[str, float]:
        """The task's metrics (percent) for `model`, from the embeddings of `dataset`."""


# The figure a zero-shot set reports (`reported`), as SLIP's and A-CLIP's tables compute it.
REPORTED_METRICS = ("top1", "mean_per_class_recall", "top1_top5_mean", "roc_auc")


class ZeroShotClassification(OneImageSetTask):
    """Classify images by their similarity to prompt-ensembled class names (CLIP's zero-shot transfer).

    Reports top-1, top-5 and mean per-class recall, and `reported`: the set's figure in the paper's tables
    (A-CLIP's `eval_zeroshot.py`, from SLIP): `reported_metric` is "top1" (most sets),
    "mean_per_class_recall" (FGVC Aircraft, Oxford Pets, Caltech-101, Flowers-102), "top1_top5_mean"
    (Kinetics-700: (top-1 + top-5) / 2) or "roc_auc" (Hateful Memes, two classes: the area under the ROC
    curve of logit(class 1) - logit(class 0), also reported as `roc_auc`).

    Args:
        dataset: items `(PIL image, label)`.
        classnames: see `aclip.evaluation.prompts.load_classnames` (default: from the dataset).
        templates: see `aclip.evaluation.prompts.load_templates` (default: from the dataset).
        name: the set's name in the metric keys.
        reported_metric: which figure `reported` is.
    """

    kind = "zeroshot"

    def __init__(
        self,
        dataset: Dataset,
        classnames: str | Sequence[str] | None = None,
        templates: str | Sequence[str] | None = None,
        name: str = "zeroshot",
        reported_metric: str = "top1",
    ) -> None:
        super().__init__(dataset, name)
        if reported_metric not in REPORTED_METRICS:
            raise ValueError(
                f"evaluation.sets.{name}.reported_metric must be one of {REPORTED_METRICS}, got "
                f"{reported_metric!r}"
            )
        self.classnames = load_classnames(classnames, dataset)
        self.templates = load_templates(templates, dataset)
        if reported_metric == "roc_auc" and len(self.classnames) != 2:
            raise ValueError(
                f"evaluation.sets.{name}: roc_auc needs two classes, the set has {len(self.classnames)}"
            )
        if reported_metric == "top1_top5_mean" and len(self.classnames) < 5:
            raise ValueError(f"evaluation.sets.{name}: top1_top5_mean needs at least 5 classes")
        self.reported_metric = reported_metric

    def score_set(self, model: ClipModel, tokenize: Tokenizer, encoded: EncodedImages) -> dict[str, float]:
        weights = zero_shot_weights(
            lambda texts: encode_texts(model, tokenize, texts), self.classnames, self.templates
        )
        logits, labels = encoded.features.to(weights.device) @ weights, encoded.labels.to(weights.device)
        results = ClassificationMetrics(len(self.classnames), weights.device)(logits, labels)
        if self.reported_metric == "roc_auc":
            auroc = BinaryAUROC(sync_on_compute=False).to(logits.device)
            results["roc_auc"] = 100.0 * auroc(logits[:, 1] - logits[:, 0], labels).item()
        elif self.reported_metric == "top1_top5_mean":
            results["top1_top5_mean"] = (results["top1"] + results["top5"]) / 2
        results["reported"] = results[self.reported_metric]
        return results


class Retrieval(OneImageSetTask):
    """Retrieve captions from images and images from captions, every caption of an image counting.

    Args:
        dataset: items are PIL images; `dataset.captions[i]` lists the captions of image i.
        name: the set's name in the metric keys.
    """

    kind = "retrieval"
    labelled = False

    def __init__(self, dataset: Dataset, name: str = "retrieval") -> None:
        super().__init__(dataset, name)

    def score_set(self, model: ClipModel, tokenize: Tokenizer, encoded: EncodedImages) -> dict[str, float]:
        captions: Sequence[Sequence[str]] = self.dataset.captions
        texts = [caption for per_image in captions for caption in per_image]
        text_to_image = torch.cat(
            [torch.full((len(per_image),), index) for index, per_image in enumerate(captions)]
        )
        return retrieval_recall(encoded.features, encode_texts(model, tokenize, texts), text_to_image)


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
                f"evaluation.sets.{name}: need at least one weight decay and 0 < val_fraction < 1, got "
                f"{list(weight_decays)} and {val_fraction}"
            )
        self.train, self.test = train, test
        self.weight_decays, self.val_fraction = tuple(weight_decays), val_fraction
        self.max_iter, self.seed = max_iter, seed

    @property
    def image_sets(self) -> list[Dataset]:
        return [self.train, self.test]

    def score(
        self, model: ClipModel, tokenize: Tokenizer, images: Sequence[EncodedImages]
    ) -> dict[str, float]:
        train, test = images
        if train.labels is None or test.labels is None:
            raise ValueError(
                f"evaluation.sets.{self.name}: the linear probe needs labelled (image, label) items"
            )
        num_classes = (
            len(getattr(self.train, "classes", ())) or int(max(train.labels.max(), test.labels.max())) + 1
        )
        # Fitted outside inference mode (Lightning's validation loop may run in it): L-BFGS needs gradients.
        with torch.inference_mode(False), torch.enable_grad():
            classifier = fit_linear_probe(
                train.features.clone(),
                train.labels.clone(),
                num_classes,
                self.weight_decays,
                self.val_fraction,
                self.max_iter,
                self.seed,
            )
        with torch.no_grad():
            logits = classifier(test.features.float())
        return ClassificationMetrics(num_classes, logits.device)(logits, test.labels)
