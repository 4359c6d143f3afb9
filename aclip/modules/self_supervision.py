"""A-CLIP's auxiliary objectives on the image views: SimCLR or SimSiam between views, BYOL to the EMA."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from aclip.modules.heads import MLPHead
from aclip.modules.losses import BYOLLoss, SimCLRLoss, SimCLRReferenceLoss, SimSiamLoss

VIEW_LOSSES = ("simclr", "simsiam", "simclr_reference")
# What the heads read: the vision tower's CLS token after its final norm, before the image projection
# (A-CLIP's code), or the projected CLIP image embedding.
SOURCES = ("cls_token", "embedding")


def heads_built(view_loss: str | None, view_weight: float, byol_weight: float) -> tuple[str | None, bool]:
    """The view loss whose head `SelfSupervision` builds (None: none, also at weight 0) and whether it builds
    BYOL's heads, which read the EMA model: what the start-up checks ask before any head exists."""
    return (view_loss if view_loss and view_weight > 0 else None), byol_weight > 0


def views_needed(view_loss: str | None, view_weight: float) -> int:
    """Views per image the objectives need: 2 for the view losses that compare different views."""
    return 2 if view_loss in ("simclr", "simsiam") and view_weight > 0 else 1


class SelfSupervision(nn.Module):
    """The heads and losses of the auxiliary objectives, weighted.

    - `view_loss="simclr"`: NT-Xent between different views of an image (other images' views are
      negatives, gathered across ranks), on an MLP head (3 layers, hidden -> out).
    - `view_loss="simclr_reference"`: the term A-CLIP's published code computes instead (its loss passes
      the first view as both augmentations, so each image's first view is its own positive); offered to
      reproduce the published numbers, never the default.
    - `view_loss="simsiam"`: negative cosine between a view's prediction and another view's
      projection (stop-gradient).
    - `byol_weight > 0`: BYOL from every online view (projector + predictor) to the EMA model's features
      of the EMA view through the EMA copy of the projector (`ema_projector`, moved by the EMA callback).
      With batch norms, the EMA projector normalises with its own batch statistics (it stays in train
      mode, as in A-CLIP's code), not with running statistics copied from the online one.

    `source` says what the heads read: "cls_token" (the vision tower's `cls_features`, width `cls_dim`;
    A-CLIP's wiring, so the auxiliary gradients reach the trunk but not the CLIP image projection) or
    "embedding" (the projected CLIP embedding, width `embed_dim`). `norm`, `activation` and the biases
    shape the heads (`MLPHead`); A-CLIP's code: batch norm, ReLU, `view_head_bias=True`,
    `byol_head_bias=False`.

    `forward(view_features [B, k, C], ema_features [B, C] | None)` returns the weighted losses by name
    (an empty dict when every weight is zero).
    """

    def __init__(
        self,
        embed_dim: int,
        cls_dim: int | None = None,
        view_loss: str | None = None,
        view_weight: float = 1.0,
        byol_weight: float = 0.0,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        source: str = "embedding",
        norm: str = "layer",
        activation: str = "gelu",
        view_head_bias: bool | None = None,
        byol_head_bias: bool | None = None,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if view_loss not in (None, *VIEW_LOSSES):
            raise ValueError(f"view_loss must be one of {VIEW_LOSSES} or null, got {view_loss!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "cls_token" and cls_dim is None:
            raise ValueError('source="cls_token" needs cls_dim, the vision tower\'s width')
        self.source = source
        if view_weight < 0 or byol_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got view_weight={view_weight}, byol_weight={byol_weight}"
            )
        # `uses_ema`: whether the objectives need the EMA model's embedding of the EMA view (BYOL's).
        self.view_loss_name, self.uses_ema = heads_built(view_loss, view_weight, byol_weight)
        self.view_weight, self.byol_weight = view_weight, byol_weight
        in_dim = cls_dim if source == "cls_token" else embed_dim
        view_head = {"norm": norm, "activation": activation, "bias": view_head_bias}
        byol_head = {"norm": norm, "activation": activation, "bias": byol_head_bias}

        if self.view_loss_name:
            self.view_projector = MLPHead(in_dim, hidden_dim, out_dim, num_layers=3, **view_head)
        if self.view_loss_name == "simclr":
            self.view_loss = SimCLRLoss(temperature)
        elif self.view_loss_name == "simclr_reference":
            self.view_loss = SimCLRReferenceLoss(temperature)
        elif self.view_loss_name == "simsiam":
            self.view_predictor = MLPHead(out_dim, hidden_dim, out_dim, num_layers=2, **view_head)
            self.view_loss = SimSiamLoss()
        if self.uses_ema:
            self.byol_projector = MLPHead(in_dim, hidden_dim, out_dim, num_layers=2, **byol_head)
            self.byol_predictor = MLPHead(out_dim, hidden_dim, out_dim, num_layers=2, **byol_head)
            self.ema_projector = copy.deepcopy(self.byol_projector).requires_grad_(False)
            self.byol_loss = BYOLLoss()

    @property
    def has_terms(self) -> bool:
        """Whether any auxiliary objective is weighted above zero."""
        return self.view_loss_name is not None or self.uses_ema

    @property
    def views_compared(self) -> int:
        """Views per image the view loss compares (1 when it compares none)."""
        return views_needed(self.view_loss_name, self.view_weight)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA module, online module) pairs that the EMA callback moves."""
        return [(self.ema_projector, self.byol_projector)] if self.uses_ema else []

    def forward(
        self, view_features: Tensor, ema_features: Tensor | None = None, view_loss: bool = True
    ) -> dict[str, Tensor]:
        """The weighted losses; `view_loss=False` leaves the view loss out (a phase of a run that trains
        on fewer views than the loss compares, `aclip.modules.stages`)."""
        losses = {}
        name = self.view_loss_name if view_loss else None
        if name in ("simclr", "simclr_reference"):  # both logged as the SimCLR term
            losses["simclr"] = self.view_weight * self.view_loss(self.view_projector(view_features))
        elif name == "simsiam":
            projections = self.view_projector(view_features)
            losses["simsiam"] = self.view_weight * self.view_loss(
                self.view_predictor(projections), projections
            )
        if self.uses_ema:
            if ema_features is None:
                raise ValueError("BYOL needs the EMA model's features of the EMA view")
            predictions = self.byol_predictor(self.byol_projector(view_features))
            with torch.no_grad():  # the target: batch statistics of its own batch (train mode), no gradient
                targets = self.ema_projector(ema_features)
            losses["byol"] = self.byol_weight * self.byol_loss(predictions, targets)
        return losses
