"""aclip: efficient CLIP pre-training by token removal (A-CLIP and its baselines).

The package's own module sits with the tasks (layer 2 of README "What is here"): it offers `aclip.load`.
"""

__version__ = "0.1.0"

from aclip import resolvers as _resolvers  # noqa: F401  (registers the config resolvers)


def __getattr__(name: str):
    """`aclip.load` (see `aclip.api`), imported on first use so that `import aclip` stays light."""
    if name == "load":
        from aclip.api import load

        return load
    raise AttributeError(f"module 'aclip' has no attribute {name!r}")
