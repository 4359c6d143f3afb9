"""`aclip.load`: a trained model, its image preprocessing and its tokenizer, in one call.

import aclip
model, preprocess, tokenizer = aclip.load("logs/train/runs/<timestamp>")   # or a .ckpt, or an export
image_features = model.encode_image(preprocess(image)[None], normalize=True)   # unit norm
text_features = model.encode_text(tokenizer(["a red circle"]), normalize=True)   # unit norm
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from aclip.datamodules.transforms import EvalTransform
from aclip.open_clip_format import CONFIG_FILE, check_export_config, read_export_config
from aclip.tokenizer import build_tokenizer
from aclip.trained import load_trained


def load(path: str | os.PathLike, model: str = "ema") -> tuple[nn.Module, Callable, Callable[..., Tensor]]:
    """`(model, preprocess, tokenizer)` of a checkpoint, a run directory or an exported folder.

    Whatever the path, the model follows open_clip's contract: `encode_image(images, normalize=False)`
    and `encode_text(tokens, normalize=False)` return the projected embeddings [N, embed_dim], unit-norm
    with `normalize=True` (as CLIP compares them); `logit_scale` is ln(1/T), the log of the inverse
    temperature; `preprocess` turns a PIL image into the model's input [3, S, S] (add the batch
    dimension); `tokenizer(texts)` returns token ids [len(texts), context_length]. The model is in eval
    mode, on the CPU.

    * A checkpoint or run directory gives this project's `aclip.modules.model.ClipModel` (the
      `model="ema"` teacher, the paper's, or the `"online"` one); its `preprocess` gives uint8 pixels,
      resized with the filter the run evaluated with (the model normalises pixels itself).
    * An `aclip.export` folder gives open_clip's `CLIP` and its transforms (float pixels, normalised by
      the preprocessing); `model` is not used (the export holds one model).
    """
    if model not in ("ema", "online"):
        raise ValueError(f'model must be "ema" or "online", got {model!r}')
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        import open_clip

        check_export_config(read_export_config(path), path)

        name = f"local-dir:{path}"
        clip, _, preprocess = open_clip.create_model_and_transforms(name)
        return clip.eval(), preprocess, open_clip.get_tokenizer(name)

    module, interpolation = load_trained(path)
    clip = (module.ema_model if model == "ema" else module.model).eval()
    preprocess = EvalTransform(clip.vision.image_size, interpolation)
    return clip, preprocess, build_tokenizer(clip.text.context_length)
