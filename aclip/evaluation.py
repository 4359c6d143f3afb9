"""Downstream evaluation of a CLIP model: zero-shot classification and image-text retrieval."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from aclip.modules.metrics import retrieval_recall, zero_shot_weights
from aclip.modules.model import ClipModel

Tokenizer = Callable[[list[str]], Tensor]


@dataclass(frozen=True)
class ZeroShotTask:
    """Classify images by their similarity to prompt-ensembled class names.

    `loader` yields (images [B, 3, H, W], labels [B]).
    """

    name: str
    loader: DataLoader
    classnames: Sequence[str]
    templates: Sequence[str]


@dataclass(frozen=True)
class RetrievalTask:
    """Retrieve captions from images and images from captions.

    `loader` yields images [B, 3, H, W] in dataset order; `captions[i]` are the captions of image i.
    """

    name: str
    loader: DataLoader
    captions: Sequence[Sequence[str]]


EvalTask = ZeroShotTask | RetrievalTask


@torch.no_grad()
def encode_texts(
    model: ClipModel, tokenize: Tokenizer, texts: Sequence[str], batch_size: int = 512
) -> Tensor:
    """Normalised text embeddings of `texts`, encoded `batch_size` at a time."""
    device = model.logit_scale.device
    chunks = [
        model.encode_text(tokenize(list(texts[i : i + batch_size])).to(device))
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_zero_shot(model: ClipModel, task: ZeroShotTask, tokenize: Tokenizer) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of zero-shot classification."""
    device = model.logit_scale.device
    weights = zero_shot_weights(
        lambda texts: encode_texts(model, tokenize, texts), task.classnames, task.templates
    )
    num_classes = len(task.classnames)
    accuracies = {
        f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device)
        for k in (1, 5)
        if k <= num_classes
    }
    for images, labels in task.loader:
        logits = model.encode_image(images.to(device)) @ weights
        for metric in accuracies.values():
            metric.update(logits, labels.to(device))
    return {name: 100.0 * metric.compute().item() for name, metric in accuracies.items()}


@torch.no_grad()
def evaluate_retrieval(model: ClipModel, task: RetrievalTask, tokenize: Tokenizer) -> dict[str, float]:
    """Image-to-text and text-to-image recall@1/5/10 (percent), every caption of an image counting."""
    device = model.logit_scale.device
    image_features = torch.cat([model.encode_image(images.to(device)) for images in task.loader])
    texts = [caption for captions in task.captions for caption in captions]
    text_to_image = torch.cat(
        [torch.full((len(captions),), index) for index, captions in enumerate(task.captions)]
    )
    text_features = encode_texts(model, tokenize, texts)
    return retrieval_recall(image_features, text_features, text_to_image)


def evaluate(model: ClipModel, tasks: Iterable[EvalTask], tokenize: Tokenizer) -> dict[str, float]:
    """Run every task; keys are `zeroshot/<name>/top1`, `retrieval/<name>/i2t_R@1`, ..."""
    was_training = model.training
    model.eval()
    metrics = {}
    try:
        for task in tasks:
            if isinstance(task, ZeroShotTask):
                results, kind = evaluate_zero_shot(model, task, tokenize), "zeroshot"
            else:
                results, kind = evaluate_retrieval(model, task, tokenize), "retrieval"
            metrics.update({f"{kind}/{task.name}/{key}": value for key, value in results.items()})
    finally:
        model.train(was_training)
    return metrics


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A text table: one row per metric, one column per evaluated model (e.g. online, ema)."""
    models = list(metrics)
    keys = sorted({key for results in metrics.values() for key in results})
    width = max([len("metric"), *map(len, keys)])
    lines = ["metric".ljust(width) + "".join(f"{name:>10}" for name in models)]
    lines.append("-" * len(lines[0]))
    for key in keys:
        cells = "".join(
            f"{metrics[name][key]:>10.2f}" if key in metrics[name] else f"{'-':>10}" for name in models
        )
        lines.append(key.ljust(width) + cells)
    return "\n".join(lines)


def write_metrics(metrics: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Write `{model name: {metric: value}}` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path
