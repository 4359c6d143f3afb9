"""`aclip.modules.metrics.retrieval_recall` and `zero_shot_weights`, public API kept at this path: the
evaluation metrics live in `aclip.evaluation.metrics`."""

from aclip.evaluation.metrics import retrieval_recall, zero_shot_weights

__all__ = ["retrieval_recall", "zero_shot_weights"]
