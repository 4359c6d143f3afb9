"""Downstream evaluation: zero-shot classification, image-text retrieval and linear probes."""

from aclip.evaluation.loaders import EvalLoaders
from aclip.evaluation.report import format_table, write_metrics
from aclip.evaluation.tasks import (
    EvalTask,
    LinearProbe,
    Retrieval,
    ZeroShotClassification,
    encode_texts,
    evaluate,
)

__all__ = [
    "EvalLoaders",
    "EvalTask",
    "LinearProbe",
    "Retrieval",
    "ZeroShotClassification",
    "encode_texts",
    "evaluate",
    "format_table",
    "write_metrics",
]
