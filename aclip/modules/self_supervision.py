"""A-CLIP's auxiliary objectives on the image views: SimCLR or SimSiam between views, BYOL to the EMA."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from aclip.modules.heads import MLPHead
from aclip.modules.losses import BYOLLoss, SimCLRLoss, SimSiamLoss

VIEW_LOSSES = ("simclr", "simsiam")


class SelfSupervision(nn.Module):
    """The heads and losses of the auxiliary objectives, weighted.

    - `view_loss="simclr"`: NT-Xent between different views of an image (other images' views are
      negatives, gathered across ranks), on an MLP head (`num_layers` 3, hidden -> out).
    - `view_loss="simsiam"`: negative cosine between a view's prediction and another view's
      projection (stop-gradient).
    - `byol_weight > 0`: BYOL from every online view (projector + predictor) to the EMA model's embedding
      of the EMA view through the EMA copy of the projector (`ema_projector`, moved by the EMA callback).

    `forward(view_embeddings [B, k, D], ema_embedding [B, D] | None)` returns the weighted losses
    by name (an empty dict when every weight is zero).
    """

    def __init__(
        self,
        embed_dim: int,
        view_loss: str | None = None,
        view_weight: float = 1.0,
        byol_weight: float = 0.0,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        norm: str = "layer",
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if view_loss not in (None, *VIEW_LOSSES):
            raise ValueError(f"view_loss must be one of {VIEW_LOSSES} or null, got {view_loss!r}")
        if view_weight < 0 or byol_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got view_weight={view_weight}, byol_weight={byol_weight}"
            )
        self.view_loss_name = view_loss if view_loss and view_weight > 0 else None
        self.view_weight, self.byol_weight = view_weight, byol_weight

        if self.view_loss_name:
            self.view_projector = MLPHead(embed_dim, hidden_dim, out_dim, num_layers=3, norm=norm)
        if self.view_loss_name == "simclr":
            self.view_loss = SimCLRLoss(temperature)
        elif self.view_loss_name == "simsiam":
            self.view_predictor = MLPHead(out_dim, hidden_dim, out_dim, num_layers=2, norm=norm)
            self.view_loss = SimSiamLoss()
        if self.uses_ema:
            self.byol_projector = MLPHead(embed_dim, hidden_dim, out_dim, num_layers=2, norm=norm)
            self.byol_predictor = MLPHead(out_dim, hidden_dim, out_dim, num_layers=2, norm=norm)
            self.ema_projector = copy.deepcopy(self.byol_projector).requires_grad_(False)
            self.byol_loss = BYOLLoss()

    @property
    def uses_ema(self) -> bool:
        """Whether the objectives need the EMA model's embedding of the EMA view."""
        return self.byol_weight > 0

    @property
    def needs_views(self) -> int:
        """The number of views per image the objectives need (2 for the view losses)."""
        return 2 if self.view_loss_name else 1

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA module, online module) pairs that the EMA callback moves."""
        return [(self.ema_projector, self.byol_projector)] if self.uses_ema else []

    def forward(self, view_embeddings: Tensor, ema_embedding: Tensor | None = None) -> dict[str, Tensor]:
        losses = {}
        if self.view_loss_name == "simclr":
            losses["simclr"] = self.view_weight * self.view_loss(self.view_projector(view_embeddings))
        elif self.view_loss_name == "simsiam":
            projections = self.view_projector(view_embeddings)
            losses["simsiam"] = self.view_weight * self.view_loss(
                self.view_predictor(projections), projections
            )
        if self.uses_ema:
            if ema_embedding is None:
                raise ValueError("BYOL needs the EMA model's embedding of the EMA view")
            predictions = self.byol_predictor(self.byol_projector(view_embeddings))
            losses["byol"] = self.byol_weight * self.byol_loss(predictions, self.ema_projector(ema_embedding))
        return losses
