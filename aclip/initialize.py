"""Start a new run from trained weights (`model.init_from`): a checkpoint or run directory of this project,
or a folder written by `aclip.export` (open_clip's format).

Only weights are read, as data; the new run has its own optimizer, schedule and step count (unlike
`ckpt_path`, which resumes a run). The checkpoint's reported model is taken (`eval_model`: the EMA
teacher by default), and the new run's EMA teacher starts as a copy of the initialised online model.
Every weight of the new model must be found with the right shape, and every weight read must be used:
anything else is an error that lists the keys, so that a silently half-initialised model cannot train.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from aclip.checkpointing import read_checkpoint, resolve_ckpt_path
from aclip.export import CONFIG_FILE, WEIGHTS_FILE, open_clip_names
from aclip.modules.model import ClipModel


class InitializationError(ValueError):
    """Weights that do not fit the model: missing, unexpected or of another shape (all listed)."""


def checkpoint_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The reported model's weights (`ClipModel` names) of a checkpoint file or run directory."""
    checkpoint = read_checkpoint(resolve_ckpt_path(path, Path.cwd()))
    state = checkpoint.get("state_dict") or {}
    prefix = (
        "ema_model."
        if (checkpoint.get("hyper_parameters") or {}).get("eval_model", "ema") == "ema"
        else "model."
    )
    weights = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
    if not weights:
        raise InitializationError(f"{path} holds no weights of aclip's model (no {prefix}* entries)")
    return weights


def export_weights(directory: Path, like: ClipModel) -> dict[str, Tensor]:
    """An `aclip.export` folder's weights under `ClipModel` names (the inverse of `open_clip_state_dict`).

    The export folds the patch embedding's bias into the patch positions; read back, the bias is zero
    and the positions keep it, which computes the same tokens.
    """
    from safetensors.torch import load_file

    theirs = load_file(str(directory / WEIGHTS_FILE))
    names = {their_name: our_name for our_name, their_name in open_clip_names(like).items()}
    unknown = sorted(set(theirs) - set(names))
    if unknown:
        raise InitializationError(
            f"{directory / WEIGHTS_FILE} holds weights this model has no place for: "
            f"{', '.join(unknown[:10])} (an open_clip model with a pre-norm or another pooling does not "
            "fit aclip's towers)"
        )
    weights = {names[name]: value for name, value in theirs.items()}
    if "vision.proj.weight" in weights:
        weights["vision.proj.weight"] = weights["vision.proj.weight"].T.contiguous()
    if "vision.trunk.cls_token" in weights:
        weights["vision.trunk.cls_token"] = weights["vision.trunk.cls_token"].view(1, 1, -1)
    if "vision.trunk.pos_embed" in weights:
        weights["vision.trunk.pos_embed"] = weights["vision.trunk.pos_embed"][None]
    weights["vision.trunk.patch_embed.proj.bias"] = torch.zeros_like(like.vision.trunk.patch_embed.proj.bias)
    return weights


def load_initial_weights(model: ClipModel, path: str | os.PathLike) -> None:
    """Load `model` from `path` (see the module), strictly.

    Raises:
        InitializationError: a weight is missing, unexpected or of another shape; all are listed.
    """
    path = Path(path)
    is_export = (path / CONFIG_FILE).is_file()
    weights = export_weights(path, model) if is_export else checkpoint_weights(path)
    _check_fits(path, "model.init_from", weights, model.state_dict())
    model.load_state_dict(weights)


def _check_fits(path: Path, key: str, weights: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Raise `InitializationError` listing the missing, unexpected and differently shaped weights."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(
        f"{name} {tuple(weights[name].shape)} (model: {tuple(expected[name].shape)})"
        for name in set(expected) & set(weights)
        if weights[name].shape != expected[name].shape
    )
    if missing or unexpected or shapes:
        problems = [
            f"missing: {', '.join(missing[:10])}" if missing else "",
            f"unexpected: {', '.join(unexpected[:10])}" if unexpected else "",
            f"other shapes: {'; '.join(shapes[:10])}" if shapes else "",
        ]
        raise InitializationError(
            f"{key}={path} does not fit this model ("
            + "; ".join(p for p in problems if p)
            + "): give the towers the sizes of the run that wrote it (model=..., model.vision.*, "
            "model.text.*)"
        )


def load_tower_weights(trunk: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a timm ViT state dict (`.safetensors`, or a `.pth`/`.bin` read as data) into a vision trunk,
    strictly, resizing the position embeddings to the trunk's grid (timm's `resample_abs_pos_embed`).

    Keys may carry timm's or open_clip's `trunk.`/`module.` prefixes; a classifier head (`head.*`) is
    dropped, since the tower has none.

    Raises:
        InitializationError: a weight is missing, unexpected or of another shape; all are listed.
    """
    from timm.layers import resample_abs_pos_embed

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(str(path))
    else:
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        weights = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
    if not isinstance(weights, dict):
        raise InitializationError(f"{path} does not hold a state dict")
    for prefix in ("module.", "trunk."):
        if all(name.startswith(prefix) for name in weights):
            weights = {name[len(prefix) :]: value for name, value in weights.items()}
    weights = {name: value for name, value in weights.items() if not name.startswith("head.")}
    expected = trunk.state_dict()
    if "pos_embed" in weights and weights["pos_embed"].shape != expected["pos_embed"].shape:
        grid = trunk.patch_embed.grid_size
        weights["pos_embed"] = resample_abs_pos_embed(
            weights["pos_embed"], list(grid), num_prefix_tokens=trunk.num_prefix_tokens
        )
    _check_fits(path, "model.vision.init_from", weights, expected)
    trunk.load_state_dict(weights)
