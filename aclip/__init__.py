"""aclip: efficient CLIP pre-training by token removal (A-CLIP and its baselines)."""

__version__ = "0.1.0"

from aclip import config as _config  # noqa: F401  (registers the config resolvers)
