"""Start a new run from trained weights (`model.init_from`): a checkpoint or run directory of this project,
or a folder written by `aclip.export` (open_clip's format).

Only weights are read, as data; the new run has its own optimizer, schedule and step count (unlike
`ckpt_path`, which resumes a run). The checkpoint's reported model is taken (`eval_model`: the EMA
teacher by default), and the new run's EMA teacher starts as a copy of the initialised online model.
Every weight of the new model must be found with the right shape, and every weight read must be used:
anything else is an error that lists the keys, so that a silently half-initialised model cannot train.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from aclip.checkpointing import load_failure_reason, read_checkpoint, resolve_ckpt_path
from aclip.errors import InputError
from aclip.open_clip_format import CONFIG_FILE, WEIGHTS_FILE, open_clip_names, stem_without_counterpart

log = logging.getLogger(__name__)


class InitializationError(InputError, ValueError):
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


def export_weights(directory: Path, like: torch.nn.Module) -> dict[str, Tensor]:
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
            f"{', '.join(unknown[:10])} (visual.ln_pre: give model.vision.pre_norm=true; "
            "an open_clip model with attentional pooling or other parts does not fit aclip's towers)"
        )
    stem_mismatch = stem_without_counterpart(like.vision)
    if stem_mismatch is not None:
        raise InitializationError(
            f"{directory} holds an open_clip model: {stem_mismatch}, so the folder has no weights for "
            "this stem. Start from a checkpoint of a run with that stem, or set model.vision.stem=patch"
        )
    weights = {names[name]: value for name, value in theirs.items()}
    if "vision.proj.weight" in weights:
        weights["vision.proj.weight"] = weights["vision.proj.weight"].T.contiguous()
    if "vision.trunk.cls_token" in weights:
        weights["vision.trunk.cls_token"] = weights["vision.trunk.cls_token"].view(1, 1, -1)
    if "vision.trunk.pos_embed" in weights:
        weights["vision.trunk.pos_embed"] = weights["vision.trunk.pos_embed"][None]
    bias = like.vision.trunk.patch_embed.proj.bias
    if bias is not None:
        weights["vision.trunk.patch_embed.proj.bias"] = torch.zeros_like(bias)
    return weights


def load_initial_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load `model` (a `ClipModel`) from `path` (see the module), strictly, the position embeddings of
    both towers resized to this model's image grid and context length (CLIPA's fine-tuning stage starts
    this way).

    Raises:
        InitializationError: a weight is missing, unexpected or of another shape; all are listed.
    """
    path = Path(path)
    is_export = (path / CONFIG_FILE).is_file()
    weights = export_weights(path, model) if is_export else checkpoint_weights(path)
    fit_image_positions(weights, "vision.trunk.pos_embed", model.vision.trunk)
    fit_text_positions(weights, "text.transformer.positional_embedding", model.text.transformer)
    _check_fits(path, "model.init_from", weights, model.state_dict())
    model.load_state_dict(weights)


def load_vision_weights(trunk: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a timm ViT state dict into a vision trunk (`model.vision.init_from`), strictly, its position
    embeddings resized to the trunk's grid.

    Keys may carry timm's or open_clip's `trunk.`/`module.` prefixes; a classifier head (`head.*`) is
    dropped, since the tower has none.

    Raises:
        InitializationError: a weight is missing, unexpected or of another shape; all are listed.
    """
    weights = read_state_dict(path, "model.vision.init_from", prefixes=("module.", "trunk."))
    weights = {name: value for name, value in weights.items() if not name.startswith("head.")}
    if "patch_embed.proj.weight" in weights and not isinstance(trunk.patch_embed.proj, torch.nn.Conv2d):
        raise InitializationError(
            f"model.vision.init_from={path} is a ViT with a linear patch embedding "
            "(patch_embed.proj.weight); this tower has a convolutional stem (model.vision.stem=conv) in its "
            "place: set model.vision.stem=patch to start from it"
        )
    fit_image_positions(weights, "pos_embed", trunk)
    _check_fits(Path(path), "model.vision.init_from", weights, trunk.state_dict())
    trunk.load_state_dict(weights)


def load_text_weights(transformer: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load an open_clip text tower into this text transformer (`model.text.init_from`), strictly, its
    position embeddings resized to the context length.

    The file may hold a whole open_clip `CLIP` state dict (its image tower and temperature are left
    out), a `CustomTextCLIP` one (`text.` prefix) or a text transformer's alone.

    Raises:
        InitializationError: a weight is missing, unexpected or of another shape; all are listed.
    """
    weights = read_state_dict(path, "model.text.init_from", prefixes=("module.",))
    weights = {
        name: value
        for name, value in weights.items()
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")
    }
    weights = _strip_common_prefix(weights, "text.")
    fit_text_positions(weights, "positional_embedding", transformer)
    _check_fits(Path(path), "model.text.init_from", weights, transformer.state_dict())
    transformer.load_state_dict(weights)


def read_state_dict(path: str | os.PathLike, key: str, prefixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors of a `.safetensors` file, or of a `.pth`/`.bin`/`.pt` file read as data
    (`weights_only`; a checkpoint's `state_dict` entry), each of `prefixes` removed where every key has it.

    Raises:
        InitializationError: the file (given as `key`) is missing, unreadable, holds pickled objects or
            holds no state dict; the message names the key and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InitializationError(f"{key}={path} does not exist; give a .safetensors, .pt, .pth or .bin file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch and safetensors raise many types for a file that is not weights
        raise InitializationError(
            f"{key}={path} cannot be read as weights: {load_failure_reason(error)}"
        ) from None
    weights = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
    if not isinstance(weights, dict) or not all(isinstance(value, Tensor) for value in weights.values()):
        raise InitializationError(f"{key}={path} does not hold a state dict (a mapping of names to tensors)")
    for prefix in prefixes:
        weights = _strip_common_prefix(weights, prefix)
    return weights


def fit_image_positions(weights: dict[str, Tensor], name: str, trunk: torch.nn.Module) -> None:
    """Resample `weights[name]`, a ViT's position embeddings of another square grid, to `trunk`'s grid
    (timm's `resample_abs_pos_embed`: bicubic, the prefix tokens kept)."""
    from timm.layers import resample_abs_pos_embed

    old, new = weights.get(name), trunk.pos_embed
    if old is None or old.dim() != 3 or old.shape == new.shape or old.shape[-1] != new.shape[-1]:
        return  # absent, or of another width: `_check_fits` reports it
    weights[name] = resample_abs_pos_embed(
        old, list(trunk.patch_embed.grid_size), num_prefix_tokens=trunk.num_prefix_tokens
    )
    log.info("%s: image position embeddings resized from %d to %d tokens", name, old.shape[1], new.shape[1])


def fit_text_positions(weights: dict[str, Tensor], name: str, transformer: torch.nn.Module) -> None:
    """Interpolate `weights[name]`, text position embeddings of another context length, to
    `transformer`'s (open_clip's `resize_text_pos_embed`: linear)."""
    from open_clip.model import resize_text_pos_embed

    old, new = weights.get(name), transformer.positional_embedding
    if old is None or old.dim() != 2 or old.shape == new.shape or old.shape[-1] != new.shape[-1]:
        return
    resized = {"positional_embedding": old}
    resize_text_pos_embed(resized, transformer)
    weights[name] = resized["positional_embedding"]
    log.info("%s: text position embeddings resized from %d to %d tokens", name, old.shape[0], new.shape[0])


def _strip_common_prefix(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if weights and all(name.startswith(prefix) for name in weights):
        return {name[len(prefix) :]: value for name, value in weights.items()}
    return weights


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
