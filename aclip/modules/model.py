"""The CLIP model: both towers and the learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aclip.modules.text import TextTower
from aclip.modules.vision import VisionTower

MAX_LOGIT_SCALE = math.log(100.0)


def l2_normalize(embeddings: Tensor) -> Tensor:
    """`embeddings` L2-normalised along the last dimension, in float32 at least under any autocast
    (half-precision embeddings are upcast first; CUDA's autocast would normalise bf16 in float32, the CPU's
    in bf16): the contrastive logits scale their dot products by up to 100."""
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()
    return F.normalize(embeddings, dim=-1)


class ClipModel(nn.Module):
    """Image and text towers projecting to one embedding space, plus `logit_scale`, ln(1/T): the log of the
    inverse temperature, so that the logits are exp(logit_scale) * I @ T^T (logged as `train/logit_scale`)."""

    def __init__(self, vision: VisionTower, text: TextTower, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.vision = vision
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    @property
    def embed_dim(self) -> int:
        """Width of the shared embedding space."""
        return self.vision.proj.out_features

    def encode_image(self, images: Tensor, keep: Tensor | None = None, normalize: bool = False) -> Tensor:
        """Image embeddings [B, embed_dim] of uint8 images [B, 3, H, W], L2-normalised (`l2_normalize`)
        with `normalize` (open_clip's `encode_image` convention); `keep` selects the patch tokens the tower
        sees."""
        features = self.vision(images, keep)
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Text embeddings [B, embed_dim] of token ids [B, L], L2-normalised (`l2_normalize`) with `normalize`
        (open_clip's `encode_text` convention)."""
        features = self.text(tokens)
        return l2_normalize(features) if normalize else features

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the inverse temperature exp(`logit_scale`) in [1, 100], i.e. `logit_scale` in [0, ln 100], as
        CLIP does."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
