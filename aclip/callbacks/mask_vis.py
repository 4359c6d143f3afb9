"""Pictures of what the masking keeps: the teacher's attention map and each view's kept patches, under a
title naming the step, the method and the policy (and the teacher warm-up's random cells while it lasts)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

DROPPED_GREY = 0.5
TITLE_FONT_SIZE = 14
_TITLE_SEPARATOR = "  ·  "


def as_unit_float(images: Tensor) -> Tensor:
    """Pixels of a batch (uint8 in [0, 255] or float in [0, 1]) as floats in [0, 1]."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)


def grey_out_dropped(views: Tensor, keep: Tensor, grid: tuple[int, int]) -> Tensor:
    """Views [N, 3, H, W] in [0, 1] with every patch not listed in `keep` [N, n_keep] greyed out."""
    kept = torch.zeros(views.shape[0], grid[0] * grid[1])
    kept.scatter_(1, keep, 1.0)
    kept = F.interpolate(kept.view(-1, 1, *grid), size=views.shape[-2:], mode="nearest")
    return views * kept + DROPPED_GREY * (1 - kept)


def heat_overlay(images: Tensor, score_map: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] blended with their score maps [B, gh, gw] (red = most attended)."""
    heat = F.interpolate(
        score_map[:, None].float(), size=images.shape[-2:], mode="bilinear", align_corners=False
    )
    low = heat.amin(dim=(2, 3), keepdim=True)
    heat = (heat - low) / (heat.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-12)
    colour = torch.cat([heat, torch.zeros_like(heat), 1 - heat], dim=1)
    return 0.5 * images + 0.5 * colour


def outline_objects(images: Tensor, masks: Tensor | None) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] with the outline of their object masks ([N, h, w], uint8 coverage,
    resized to the images) drawn in yellow, one pixel wide; unchanged without masks."""
    if masks is None:
        return images
    inside = F.interpolate(masks[:, None].float(), size=images.shape[-2:], mode="bilinear") >= 127.5
    inside = inside.float()
    edge = F.max_pool2d(inside, 3, stride=1, padding=1) - inside  # the pixels just outside the object
    yellow = torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1)
    return images * (1 - edge) + yellow * edge


def render_masking(record: dict[str, Any], tile: int = 224) -> Tensor:
    """One row per sample: the EMA crop with its heat map and view boxes (when scored), then each view
    with its dropped patches greyed out; the objects outlined in yellow where the data knows them.
    Returns an image [3, H, W] in [0, 1]."""
    num_views, grid = record["num_views"], record["grid"]
    views = grey_out_dropped(as_unit_float(record["views"]), record["keep"], grid)
    views = F.interpolate(views, size=(tile, tile), mode="nearest")
    views = outline_objects(views, record.get("object_masks"))
    rows = views.unflatten(0, (-1, num_views))
    if "score_map" in record:
        ema = heat_overlay(as_unit_float(record["ema_image"]), record["score_map"])
        ema = F.interpolate(ema, size=(tile, tile), mode="bilinear", align_corners=False)
        ema = outline_objects(ema, record.get("ema_object_mask"))
        ema = torch.stack(
            [
                draw_bounding_boxes((image * 255).to(torch.uint8), boxes * tile, colors="white") / 255.0
                for image, boxes in zip(ema, record["boxes"].float(), strict=True)
            ]
        )
        rows = torch.cat([ema[:, None], rows], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=2, pad_value=1.0)


def picture_title(step: int, policy: str, method: str | None = None, warmup: str | None = None) -> str:
    """What a mask picture shows: the optimizer step, the method (the `method` choice, where one is made)
    and its masking policy, and, during the teacher warm-up, `warmup`: that the kept cells are random, and
    until when (`TeacherWarmup.label`)."""
    parts = [f"step {step}", *([f"method {method}"] if method else []), policy]
    if warmup is not None:
        parts.append(warmup)
    return _TITLE_SEPARATOR.join(parts)


def with_title(picture: Tensor, title: str) -> Tensor:
    """`picture` [3, H, W] in [0, 1] below a white band holding `title`, wrapped to the picture's width."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=TITLE_FONT_SIZE)
    width, margin = picture.shape[-1], 4
    lines = [""]
    for part in title.split(_TITLE_SEPARATOR):
        joined = f"{lines[-1]}{_TITLE_SEPARATOR}{part}" if lines[-1] else part
        if lines[-1] and font.getlength(joined) > width - 2 * margin:
            lines.append(part)
        else:
            lines[-1] = joined
    line_height = TITLE_FONT_SIZE + 4
    band = Image.new("RGB", (width, len(lines) * line_height + 2 * margin), "white")
    draw = ImageDraw.Draw(band)
    for index, line in enumerate(lines):
        draw.text((margin, margin + index * line_height), line, fill="black", font=font)
    band_pixels = torch.from_numpy(np.array(band)).permute(2, 0, 1).float() / 255
    return torch.cat([band_pixels, picture], dim=1)


def save_picture(picture: Tensor, title: str, path: Path) -> None:
    """Write `picture` [3, H, W] in [0, 1] as a PNG whose `Title` text chunk holds `title`."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = (picture * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    info = PngInfo()
    info.add_text("Title", title)
    Image.fromarray(pixels).save(path, pnginfo=info)


def masking_record(outputs: Mapping[str, Any], batch: Mapping[str, Tensor], samples: int) -> dict[str, Any]:
    """What a training step (its `outputs`: views, num_views, keep, grid, score_map) showed the encoders
    for the first `samples` samples of `batch`, with their objects and, when scored, the teacher's crop,
    score map and its views' boxes: CPU copies, as `render_masking` reads them."""
    num_views = outputs["num_views"]  # the first views of the batch's (`aclip.modules.stages`)
    record = {
        "views": outputs["views"][: samples * num_views],
        "keep": outputs["keep"][: samples * num_views],
    }
    if "object_masks" in batch:
        record["object_masks"] = batch["object_masks"][:samples, :num_views].flatten(0, 1)
    if outputs.get("score_map") is not None:
        teacher = {
            "ema_image": batch["ema_image"],
            "score_map": outputs["score_map"],
            "boxes": batch["boxes"][:, :num_views],
        }
        if "ema_object_mask" in batch:
            teacher["ema_object_mask"] = batch["ema_object_mask"]
        record |= {name: value[:samples] for name, value in teacher.items()}
    record = {name: value.detach().cpu() for name, value in record.items()}
    return record | {"grid": outputs["grid"], "num_views": num_views}


class MaskVisualization(Callback):
    """Every `every_n_steps` optimizer steps, draws the masking of `num_samples` training samples, each
    image `tile` pixels wide, under a title (`picture_title`; `method` names the run's method).

    Pictures go to `<run dir>/mask_pictures/step<step>.png` and, where a W&B or TensorBoard logger is
    active, to its image panel under `train/masking`.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 4,
        dirname: str = "mask_pictures",
        tile: int = 224,
        method: str | None = None,
    ) -> None:
        if every_n_steps < 1 or num_samples < 1 or tile < 16:
            raise ValueError(
                f"every_n_steps and num_samples must be >= 1 and tile >= 16, got {every_n_steps}, "
                f"{num_samples}, {tile}"
            )
        self.every_n_steps, self.num_samples, self.dirname = every_n_steps, num_samples, dirname
        self.tile, self.method = tile, method
        self._recorded_step: int | None = None
        self._drawn_step: int | None = None
        self._title = ""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # the same for every micro-batch of an accumulated step: draw its first
        drawing = step % self.every_n_steps == 0 and step != self._drawn_step and trainer.is_global_zero
        self._recorded_step = step if drawing else None
        if drawing:  # the step's policy, known before the step (global_step moves on when it ends)
            warmup = (
                pl_module.teacher_warmup.label() if getattr(pl_module, "in_teacher_warmup", False) else None
            )
            self._title = picture_title(step, repr(getattr(pl_module, "masking", "")), self.method, warmup)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Mapping[str, Any],
        batch: Mapping[str, Tensor],
        batch_idx: int,
    ) -> None:
        if self._recorded_step is None:
            return
        picture = render_masking(masking_record(outputs, batch, self.num_samples), self.tile)
        picture = with_title(picture, self._title)
        directory = Path(trainer.default_root_dir) / self.dirname
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step{self._recorded_step:07d}.png"
        save_picture(picture, self._title, path)
        self._drawn_step = self._recorded_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "train/masking", [str(path)], step=trainer.global_step, caption=[self._title]
                )
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("train/masking", picture, self._recorded_step)
