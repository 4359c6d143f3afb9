"""Contrastive losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from aclip.distributed import rank_and_world


def gather_with_grad(features: Tensor) -> Tensor:
    """Concatenate `features` from every rank along dim 0; gradients flow back to each rank's slice."""
    _, world = rank_and_world()
    if world == 1:
        return features
    return torch.cat(dist_fn.all_gather(features), dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP over the global batch.

    `loss(image_features, text_features, logit_scale)` takes L2-normalised features of the local batch
    and the logit scale ln(1/T), the log of the inverse temperature (the learnable parameter, logits =
    exp(logit_scale) * I @ T^T).

    Under torch.distributed each rank scores its own rows against the features of every rank
    (gathered with gradient), so per-rank cost is B_local x B_global rather than B_global^2. The mean
    of the ranks' local losses is the global-batch loss, which is what DDP's gradient averaging
    optimises; the returned value is shifted (without gradient) to that global mean so that every
    rank reports the global-batch loss itself. The logits (`logits`) and the cross-entropy are float32
    under any autocast.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image and text features must have the same shape, got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        rank, _ = rank_and_world()
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device) + rank * batch
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return _report_global_mean(loss)

    def logits(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> tuple[Tensor, Tensor]:
        """exp(logit_scale) times the similarities of the local images to every rank's texts and of the
        local texts to every rank's images, [B, N] each, in float32 under any autocast (half-precision
        features are upcast after the gather): bf16 keeps 8 significant bits, so logits near the largest
        scale, 100, would move in steps of 0.5."""
        all_images = _upcast(gather_with_grad(image_features))
        all_texts = _upcast(gather_with_grad(text_features))
        images, texts = _upcast(image_features), _upcast(text_features)
        with _full_precision(images):
            scale = logit_scale.exp()
            return scale * images @ all_texts.T, scale * texts @ all_images.T


def _check_views(name: str, views: Tensor, min_views: int) -> None:
    if views.dim() != 3 or views.shape[0] < 1 or views.shape[1] < min_views or views.shape[2] < 1:
        raise ValueError(f"{name} must be [B, k, D] with B >= 1, k >= {min_views}, got {tuple(views.shape)}")


def _upcast(tensor: Tensor) -> Tensor:
    """Half-precision tensors as float32; float32/float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _full_precision(tensor: Tensor) -> torch.autocast:
    """Context that disables autocast on `tensor`'s device: the similarities below are computed in float32
    (cheap next to the encoders, and a temperature of 0.1 would magnify bf16/fp16 rounding)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _report_global_mean(loss: Tensor) -> Tensor:
    """Shift `loss` (without gradient) to the mean of the ranks' values: with equal local batches, the
    global-batch loss, reported alike by every rank while each rank's gradient stays its own."""
    _, world = rank_and_world()
    if world == 1:
        return loss
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    return loss + (global_loss / world - loss.detach())


class _TemperatureLoss(nn.Module):
    """A contrastive loss over similarities divided by `temperature` (> 0)."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature


class SimCLRLoss(_TemperatureLoss):
    """Multi-view NT-Xent (SimCLR) between the k views of each image, over the global batch.

    `forward(views)` takes `views` [B, k, D] (k >= 2): projected features of k differently augmented views
    of each image of the local batch, not normalised (they are L2-normalised here). With z_i the
    normalised feature of view i = (b, v) and s_ij = <z_i, z_j> / temperature, for every anchor i and
    every positive j = (b, v') with v' != v (another view of the SAME image, never i itself):

        l_ij = -s_ij + log sum_{m != i} exp(s_im)

    where m runs over every view of every image of the global batch except the anchor itself (the other
    views of the same image stay in the denominator, as in SimCLR). The loss is the mean of l_ij over all
    N * k * (k - 1) (anchor, positive) pairs, N the global batch; every anchor has k - 1 positives, so this
    is also the mean over anchors of the mean over their positives. For k = 2 it is exactly SimCLR's
    NT-Xent on the 2N x 2N similarity matrix.

    Under torch.distributed the local anchors are scored against the views of every rank (gathered with
    gradient), labels offset by rank * B * k, so per-rank cost is (B k) x (N k). Local batches must have
    the same size on every rank (as for ClipLoss); the mean of the ranks' losses is then the global-batch
    loss, and the returned value is shifted (without gradient) to it so that every rank reports it.
    Similarities are computed in float32 even under autocast (inputs of lower precision are upcast; float64
    stays float64).
    """

    def forward(self, views: Tensor) -> Tensor:
        _check_views("views", views, min_views=2)
        batch, k, dim = views.shape
        rank, _ = rank_and_world()
        anchors = F.normalize(_upcast(views), dim=-1).reshape(batch * k, dim)  # row b * k + v
        candidates = gather_with_grad(anchors)  # row (rank * B + b) * k + v
        with _full_precision(views):
            logits = anchors @ candidates.T / self.temperature
        device = views.device
        offset = rank * batch * k
        self_index = torch.arange(batch * k, device=device) + offset
        logits = logits.masked_fill(
            torch.arange(candidates.shape[0], device=device)[None, :] == self_index[:, None], float("-inf")
        )
        log_prob = F.log_softmax(logits, dim=-1)
        # For view v, the other views v' != v of the same image, ascending: [k, k - 1]. Arithmetic rather
        # than boolean indexing, whose data-dependent size would synchronise a CUDA stream.
        other = torch.arange(k - 1, device=device)[None, :]
        others = other + (other >= torch.arange(k, device=device)[:, None])
        image_start = (torch.arange(batch, device=device) * k + offset)[:, None, None]  # [B, 1, 1]
        positives = (image_start + others[None]).reshape(batch * k, k - 1)
        loss = -log_prob.gather(1, positives).mean()
        return _report_global_mean(loss)


class SimCLRReferenceLoss(_TemperatureLoss):
    """The SimCLR term of A-CLIP's published code, reproduced to bracket its numbers (not the default).

    Its `ACLIPLoss` passes the first view's projections as both augmentations of SLIP's `SIMCLRLoss`, so
    each anchor's "positive" is itself. With z_b the normalised projection of image b's first view
    (`views[:, 0]`), s_bc = <z_b, z_c> / temperature and N the global batch, the loss is the mean over
    anchors b of

        -s_bb + log( sum_c exp(s_bc) + sum_{c != b} exp(s_bc) ),

    cross-entropy over the 2N logits [s_b., s_b. with the self term masked out] at label b. Its gradient
    only spreads the first views apart; the second view is never used. Gathered and reported like
    `SimCLRLoss`.
    """

    def forward(self, views: Tensor) -> Tensor:
        _check_views("views", views, min_views=1)
        rank, _ = rank_and_world()
        anchors = F.normalize(_upcast(views[:, 0]), dim=-1)  # [B, D]
        candidates = gather_with_grad(anchors)  # [N, D]
        with _full_precision(views):
            logits = anchors @ candidates.T / self.temperature  # [B, N]
        labels = torch.arange(anchors.shape[0], device=views.device) + rank * anchors.shape[0]
        self_term = torch.arange(candidates.shape[0], device=views.device)[None, :] == labels[:, None]
        masked = logits.masked_fill(self_term, float("-inf"))
        loss = F.cross_entropy(torch.cat([logits, masked], dim=1), labels)
        return _report_global_mean(loss)


class SimSiamLoss(nn.Module):
    """Symmetric negative cosine of SimSiam between the k views of each image.

    `forward(predictions, projections)`, both [B, k, D] (k >= 2): predictor outputs p and projector outputs
    z of each view. The loss is the mean over samples and over the k (k - 1) ordered pairs of different
    views v != v' of -cos(p_v, stopgrad(z_v')); for k = 2 it is SimSiam's (D(p1, z2) + D(p2, z1)) / 2.
    No gradient reaches `projections` through this loss (they still get gradient through the predictor
    that produced `predictions`). It is a per-sample loss, so nothing is gathered: each rank's gradient is
    that of the mean of its local batch, and with equal local batches DDP's gradient averaging optimises
    the global mean. The returned value is shifted (without gradient) to the mean of the ranks' values, the
    global-batch loss, so that every rank reports it (as ClipLoss and SimCLRLoss do).
    """

    def forward(self, predictions: Tensor, projections: Tensor) -> Tensor:
        _check_views("predictions", predictions, min_views=2)
        if projections.shape != predictions.shape:
            raise ValueError(
                f"predictions and projections must have the same shape, got {tuple(predictions.shape)} "
                f"and {tuple(projections.shape)}"
            )
        k = predictions.shape[1]
        p = F.normalize(_upcast(predictions), dim=-1)
        z = F.normalize(_upcast(projections.detach()), dim=-1)
        with _full_precision(p):
            cos = p @ z.transpose(1, 2)  # [B, k, k], cos[b, v, v'] = cos(p_v, z_v')
        # The mean over the off-diagonal pairs, without boolean indexing (a CUDA synchronisation).
        off_diagonal = cos.sum() - cos.diagonal(dim1=1, dim2=2).sum()
        return _report_global_mean(-off_diagonal / (cos.shape[0] * k * (k - 1)))


class BYOLLoss(nn.Module):
    """BYOL regression of every online view onto the EMA target of its image.

    `forward(predictions, targets)`: `predictions` [B, k, D] (online predictor(projector(view embedding)),
    k >= 1), `targets` [B, D] (EMA projector of the EMA model's embedding of the EMA view; detached here,
    no gradient ever reaches it). The loss is the mean over samples and views of

        ||p_v / |p_v| - t / |t| ||^2 = 2 - 2 cos(p_v, t),

    in [0, 4]. Per-sample like SimSiamLoss: nothing is gathered, the gradient is that of the local mean,
    and the returned value is shifted (without gradient) to the global-batch mean.
    """

    def forward(self, predictions: Tensor, targets: Tensor) -> Tensor:
        _check_views("predictions", predictions, min_views=1)
        batch, _, dim = predictions.shape
        if targets.shape != (batch, dim):
            raise ValueError(
                f"targets must be [B, D] = {(batch, dim)} for predictions {tuple(predictions.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        p = F.normalize(_upcast(predictions), dim=-1)
        t = F.normalize(_upcast(targets.detach()), dim=-1)
        cos = (p * t[:, None, :]).sum(dim=-1)  # [B, k]
        return _report_global_mean((2 - 2 * cos).mean())
