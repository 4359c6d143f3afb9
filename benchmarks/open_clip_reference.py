"""open_clip's training step on towers shaped as an aclip variant's: the reference of `step_cost`.

`OpenClipStep` is a LightningModule holding `open_clip.CLIP` built from the variant's tower sizes, trained
with `open_clip.ClipLoss` and the same AdamW (fused, the same decay groups and hyper-parameters) and
learning-rate schedule as `AClip`. It reads the same fixed batch (the first view; uint8 pixels normalised on
the device, as `VisionTower` does), so the two steps differ only in the code under test. open_clip's
`patch_dropout` is its FLIP-style random token removal, the counterpart of `random_1x50`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import open_clip
import pytorch_lightning as pl
from torch import Tensor, nn

from aclip.modules.aclip import AClip
from aclip.modules.schedule import configure_optimization

# aclip variant -> open_clip's patch_dropout of its reference (open_clip has no attentive masking, so
# aclip_eff is compared with the plain CLIP step it is meant to beat).
PAIRS: dict[str, float] = {"clip": 0.0, "random_1x50": 0.5, "aclip_eff": 0.0}


def reference_name(patch_dropout: float) -> str:
    """The benchmark row name of open_clip's step with `patch_dropout`."""
    return "open_clip" if patch_dropout == 0 else f"open_clip_pd{round(patch_dropout * 100)}"


def trainable_parameters(module: nn.Module) -> int:
    """Number of parameters the optimizer updates (an EMA copy and frozen weights excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class OpenClipStep(pl.LightningModule):
    """open_clip's CLIP + ClipLoss with the tower sizes, optimizer and schedule of `like` (an `AClip`)."""

    def __init__(self, like: AClip, patch_dropout: float = 0.0) -> None:
        super().__init__()
        vision, text = like.model.vision, like.model.text
        block = vision.trunk.blocks[0]
        vision_cfg = open_clip.CLIPVisionCfg(
            layers=len(vision.trunk.blocks),
            width=vision.width,
            head_width=vision.width // block.attn.num_heads,
            mlp_ratio=block.mlp.fc1.out_features / vision.width,
            patch_size=vision.patch_size,
            image_size=vision.image_size,
            patch_dropout=patch_dropout,
        )
        blocks = text.transformer.transformer.resblocks
        text_width = text.transformer.width
        text_cfg = open_clip.CLIPTextCfg(
            context_length=text.context_length,
            vocab_size=text.vocab_size,
            width=text_width,
            heads=blocks[0].attn.num_heads,
            layers=len(blocks),
            mlp_ratio=blocks[0].mlp.c_fc.out_features / text_width,
        )
        self.model = open_clip.CLIP(
            embed_dim=vision.proj.out_features,
            vision_cfg=vision_cfg,
            text_cfg=text_cfg,
            quick_gelu=like.hparams.text.get("activation") == "quick_gelu",
        )
        self.loss = open_clip.ClipLoss()
        self.register_buffer("pixel_mean", vision.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", vision.pixel_std.clone(), persistent=False)
        self.optimizer, self.scheduler = like.hparams.optimizer, like.hparams.scheduler  # the same recipe

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["images"][:, 0].float().div_(255)  # the first view, uint8 pixels as aclip reads
        images = (images - self.pixel_mean) / self.pixel_std
        image_features, text_features, logit_scale = self.model(images, batch["text"])
        return self.loss(image_features, text_features, logit_scale)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self.parameters(), self.optimizer, self.scheduler, self.trainer)


def build_reference(module: AClip, patch_dropout: float, seed: int = 0) -> OpenClipStep:
    """open_clip's reference for `module`, its weights drawn from `seed`."""
    pl.seed_everything(seed, workers=False, verbose=False)
    return OpenClipStep(module, patch_dropout)
