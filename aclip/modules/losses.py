"""Contrastive losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: Tensor) -> Tensor:
    """Concatenate `features` from every rank along dim 0; gradients flow back to each rank's slice."""
    _, world = _world()
    if world == 1:
        return features
    return torch.cat(dist_fn.all_gather(features), dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP over the global batch.

    `loss(image_features, text_features, logit_scale)` takes L2-normalised features of the local batch
    and the *log* temperature scale (the learnable parameter, logits = exp(logit_scale) * I @ T^T).

    Under torch.distributed each rank scores its own rows against the features of every rank
    (gathered with gradient), so per-rank cost is B_local x B_global rather than B_global^2. The mean
    of the ranks' local losses is the global-batch loss, which is what DDP's gradient averaging
    optimises; the returned value is shifted (without gradient) to that global mean so that every
    rank reports the global-batch loss itself.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image and text features must have the same shape, got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        rank, world = _world()
        all_images = gather_with_grad(image_features)
        all_texts = gather_with_grad(text_features)
        scale = logit_scale.exp()
        logits_per_image = scale * image_features @ all_texts.T
        logits_per_text = scale * text_features @ all_images.T
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device) + rank * batch
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        if world == 1:
            return loss
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        return loss + (global_loss / world - loss.detach())
