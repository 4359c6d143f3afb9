"""Layer 4, data and evaluation: zero-shot classification, image-text retrieval and linear probes.

The names the configs' `_target_`s and the tasks use, from the modules that define them."""

from aclip.evaluation.loaders import EvalLoaders
from aclip.evaluation.report import format_table, write_metrics
from aclip.evaluation.suite import Evaluation, EvaluationError, FeatureBank, Metrics, evaluate, split_batch
from aclip.evaluation.tasks import (
    EncodedImages,
    EvalTask,
    LinearProbe,
    Retrieval,
    ZeroShotClassification,
    encode_texts,
)

__all__ = [
    "EncodedImages",
    "EvalLoaders",
    "EvalTask",
    "Evaluation",
    "EvaluationError",
    "FeatureBank",
    "LinearProbe",
    "Metrics",
    "Retrieval",
    "ZeroShotClassification",
    "encode_texts",
    "evaluate",
    "format_table",
    "split_batch",
    "write_metrics",
]
