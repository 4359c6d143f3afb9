"""The config resolvers of aclip's configs, registered when the package is imported (`import aclip`, as
`train.py`, `evaluate.py` and the console scripts do), before Hydra resolves any value."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from aclip.errors import ConfigError

# `${floordiv:${data.image_size},2}`: sizes derived from others, e.g. A-CLIP-eff's half-resolution teacher.
if not OmegaConf.has_resolver("floordiv"):
    OmegaConf.register_new_resolver(
        "floordiv", lambda numerator, denominator: int(numerator) // int(denominator)
    )
# `${aclip.launch_dir:}`: the directory the command was started in (Hydra never changes into the run
# directory here, `hydra.job.chdir: false`). Unlike `${hydra:runtime.cwd}` it resolves before Hydra's
# runtime config exists, which is when a multirun's sweeper resolves `hydra.sweep.dir`.
if not OmegaConf.has_resolver("aclip.launch_dir"):
    OmegaConf.register_new_resolver("aclip.launch_dir", os.getcwd)

# `${aclip.required:model.init_from,the first stage's run directory}`: a value a preset cannot know and
# the command line must give (OmegaConf's `???` cannot stand in: merged over a default, it is ignored).
if not OmegaConf.has_resolver("aclip.required"):

    def _required(key: str, what: str) -> Any:
        raise ConfigError(f"{key} is required here: give {key}=<{what}> on the command line")

    OmegaConf.register_new_resolver("aclip.required", _required)
