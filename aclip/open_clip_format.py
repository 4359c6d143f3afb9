"""The open_clip folder that `aclip.export` writes and `aclip.load` and `model.init_from` read: its file
names, the schema of its config (the only keys such a folder may hold) and the names its weights take.

A folder holds `open_clip_config.json` (open_clip's `{"model_cfg", "preprocess_cfg"}`) and
`open_clip_model.safetensors` (open_clip `CLIP`'s state dict), which
`open_clip.create_model_and_transforms("local-dir:<dir>")` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from aclip.checkpointing import CheckpointError
from aclip.specs import SpecError, check_plain

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

# The keys `aclip.export.open_clip_config` writes, nested as it nests them: the only ones
# `check_export_config` accepts.
_CONFIG_KEYS: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": None,
        "vision_cfg": {
            **dict.fromkeys(("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")),
            **dict.fromkeys(("no_ln_pre", "pool_type", "final_ln_after_pool")),
            "norm_kwargs": {"eps": None},
        },
        "text_cfg": dict.fromkeys(("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")),
    },
    "preprocess_cfg": dict.fromkeys(("size", "mean", "std", "interpolation", "resize_mode")),
}


def check_export_config(
    config: Any, path: Path, keys: dict[str, Any] = _CONFIG_KEYS, prefix: str = ""
) -> None:
    """Raise `CheckpointError` unless `config` (an export folder's `open_clip_config.json`) holds only the
    keys `aclip.export.open_clip_config` writes, with plain values. open_clip acts on other keys of its
    own schema (`hf_model_name` and `timm_model_pretrained` download weights, `custom_text` builds other
    towers): a folder is data, and must not choose what runs or what is fetched."""
    if not isinstance(config, dict):
        what = prefix.rstrip(".") or "the config"
        raise CheckpointError(f"{path}: {what} must be a mapping, got {type(config).__name__}")
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in keys:
            raise CheckpointError(
                f"{path} has {name}, which aclip's exports never write (open_clip would act on it); load a "
                "folder written by `python -m aclip.export`, or other open_clip folders with open_clip itself"
            )
        if keys[key] is not None:
            check_export_config(value, path, keys[key], f"{name}.")
            continue
        try:
            check_plain(value, name)
        except SpecError as error:
            raise CheckpointError(f"{path}: {error}") from None


def read_export_config(directory: Path) -> Any:
    """The parsed `open_clip_config.json` of an export folder (`CheckpointError` if it is not JSON)."""
    path = directory / CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not a JSON config written by aclip.export: {error}") from None


# A timm ViT block's parts and their open_clip names (timm's `attn.qkv` is open_clip's packed in_proj).
_BLOCK_PARTS = (
    ("norm1.weight", "ln_1.weight"),
    ("norm1.bias", "ln_1.bias"),
    ("attn.qkv.weight", "attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.weight", "attn.out_proj.weight"),
    ("attn.proj.bias", "attn.out_proj.bias"),
    ("norm2.weight", "ln_2.weight"),
    ("norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
)


def stem_without_counterpart(vision: nn.Module) -> str | None:
    """Why the image tower `vision` (a `VisionTower`) has no open_clip counterpart, None when it has one:
    open_clip's VisionTransformer embeds patches with one linear projection (`visual.conv1`), which a
    convolutional stem replaces."""
    if vision.stem == "patch":
        return None
    return (
        f"this model's image tower has a convolutional stem (model.vision.stem={vision.stem}), and "
        "open_clip's VisionTransformer embeds patches with one linear projection"
    )


def open_clip_names(model: nn.Module) -> dict[str, str]:
    """A `ClipModel`'s weight name -> open_clip `CLIP` name, for every weight the export writes (the patch
    embedding's bias is folded into the positions instead, see `aclip.export.open_clip_state_dict`)."""
    names = {
        "vision.trunk.patch_embed.proj.weight": "visual.conv1.weight",
        "vision.trunk.cls_token": "visual.class_embedding",
        "vision.trunk.pos_embed": "visual.positional_embedding",
        "vision.trunk.norm.weight": "visual.ln_post.weight",
        "vision.trunk.norm.bias": "visual.ln_post.bias",
        "vision.proj.weight": "visual.proj",
        "logit_scale": "logit_scale",
    }
    if model.vision.pre_norm:
        names["vision.trunk.norm_pre.weight"] = "visual.ln_pre.weight"
        names["vision.trunk.norm_pre.bias"] = "visual.ln_pre.bias"
    for index in range(len(model.vision.trunk.blocks)):
        for ours, theirs in _BLOCK_PARTS:
            names[f"vision.trunk.blocks.{index}.{ours}"] = f"visual.transformer.resblocks.{index}.{theirs}"
    for name in model.text.transformer.state_dict():
        if name != "attn_mask":  # a buffer open_clip rebuilds
            names[f"text.transformer.{name}"] = name
    return names
