"""Export a trained model to open_clip: a folder `open_clip.create_model_and_transforms("local-dir:<dir>")`
loads, so that clip_benchmark and every open_clip user can evaluate or fine-tune it.

    python -m aclip.export logs/train/runs/<timestamp> exported/            # the EMA model (the paper's)
    python -m aclip.export path/to/last.ckpt exported/ --model online

The folder holds `open_clip_config.json` (the model config, and the preprocessing: this model's image
size, pixel mean and std, and resize filter) and `open_clip_model.safetensors`. The image tower is
rewritten as open_clip's own `VisionTransformer` (its pre-norm and pooling, timm's LayerNorm epsilon),
the patch embedding's bias folded into the patch positions' embeddings, so the exported model computes
the same embeddings (tested to float tolerance). The text tower is open_clip's already.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from open_clip.transformer import QuickGELU
from torch import Tensor

from aclip.modules.model import ClipModel
from aclip.modules.vision import NORMALIZATIONS
from aclip.open_clip_format import CONFIG_FILE, WEIGHTS_FILE, open_clip_names, stem_without_counterpart
from aclip.trained import load_trained


def open_clip_config(model: ClipModel, interpolation: str = "bicubic") -> dict[str, Any]:
    """open_clip's `{"model_cfg", "preprocess_cfg"}` describing `model`.

    Raises:
        ValueError: the text tower uses QuickGELU (open_clip's config has one activation switch for
            both of its native towers, and this image tower, timm's ViT, uses GELU), or the image tower
            has a convolutional stem (open_clip's ViT has a linear patch embedding only).
    """
    vision, text = model.vision, model.text
    stem_mismatch = stem_without_counterpart(vision)
    if stem_mismatch is not None:
        raise ValueError(
            f"{stem_mismatch}: the export cannot express it. Evaluate the checkpoint with evaluate.py or "
            "aclip.load instead"
        )
    blocks, text_blocks = vision.trunk.blocks, text.transformer.transformer.resblocks
    if isinstance(text_blocks[0].mlp.gelu, QuickGELU):
        raise ValueError(
            "this model's text tower uses QuickGELU and its image tower GELU; open_clip's config sets one "
            "activation for both native towers, so the export would change the model. Export a model "
            "trained with model.text.activation=gelu (the project default)"
        )
    mean, std = NORMALIZATIONS[vision.normalize]
    return {
        "model_cfg": {
            "embed_dim": model.embed_dim,
            "vision_cfg": {
                "image_size": vision.image_size,
                "patch_size": vision.patch_size,
                "width": vision.width,
                "layers": len(blocks),
                "head_width": vision.width // blocks[0].attn.num_heads,
                "mlp_ratio": blocks[0].mlp.fc1.out_features / vision.width,
                "no_ln_pre": not vision.pre_norm,
                "pool_type": "tok" if vision.pool == "token" else "avg",
                "final_ln_after_pool": False,
                "norm_kwargs": {"eps": vision.trunk.norm.eps},
            },
            "text_cfg": {
                "context_length": text.context_length,
                "vocab_size": text.vocab_size,
                "width": text.transformer.width,
                "heads": text_blocks[0].attn.num_heads,
                "layers": len(text_blocks),
                "mlp_ratio": text_blocks[0].mlp.c_fc.out_features / text.transformer.width,
            },
        },
        "preprocess_cfg": {
            "size": vision.image_size,
            "mean": list(mean),
            "std": list(std),
            "interpolation": interpolation,
            "resize_mode": "shortest",
        },
    }


def open_clip_state_dict(model: ClipModel) -> dict[str, Tensor]:
    """`model`'s weights under open_clip `CLIP`'s names (contiguous CPU tensors, for safetensors)."""
    ours = dict(model.state_dict())
    trunk = model.vision.trunk
    # Tokens = conv(x) + bias + position: the bias joins the patch positions (the CLS token has none).
    # (A tower with a pre-norm has no bias, as CLIP's.)
    positions = ours["vision.trunk.pos_embed"][0].clone()
    if "vision.trunk.patch_embed.proj.bias" in ours:
        positions[trunk.num_prefix_tokens :] += ours["vision.trunk.patch_embed.proj.bias"]
    ours["vision.trunk.pos_embed"] = positions
    ours["vision.trunk.cls_token"] = ours["vision.trunk.cls_token"][0, 0]
    ours["vision.proj.weight"] = ours["vision.proj.weight"].T  # x @ proj in open_clip, a Linear here
    return {theirs: ours[name].detach().cpu().contiguous() for name, theirs in open_clip_names(model).items()}


def export(model: ClipModel, directory: str | Path, interpolation: str = "bicubic") -> Path:
    """Write `model` as an open_clip folder (see the module); returns the folder."""
    from safetensors.torch import save_file

    config = open_clip_config(model, interpolation)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(open_clip_state_dict(model), str(directory / WEIGHTS_FILE))
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aclip.export", description="Export a checkpoint's model as an open_clip folder."
    )
    parser.add_argument("checkpoint", help="a .ckpt file or a run directory (its newest last checkpoint)")
    parser.add_argument("out_dir", type=Path, help="the folder to write (created if missing)")
    parser.add_argument(
        "--model", choices=["ema", "online"], default="ema", help="which model (default: ema)"
    )
    args = parser.parse_args(argv)
    module, interpolation = load_trained(args.checkpoint)
    model = module.ema_model if args.model == "ema" else module.model
    try:
        directory = export(model, args.out_dir, interpolation=interpolation)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {directory / CONFIG_FILE} and {directory / WEIGHTS_FILE}")
    print(f'load it with open_clip.create_model_and_transforms("local-dir:{directory}")')
    return 0


if __name__ == "__main__":
    sys.exit(main())
