"""Tests for the CLIP contrastive loss, single-process and across two gloo ranks."""

import math

import pytest
import torch
import torch.nn.functional as F

from aclip.modules.losses import ClipLoss
from tests.helpers import gloo_world


def reference_clip_loss(images, texts, logit_scale):
    """Loop-based symmetric InfoNCE, written independently of the code under test.

    For each image i: -log( exp(s * <I_i, T_i>) / sum_j exp(s * <I_i, T_j>) ), s = exp(logit_scale);
    same for each text against all images; the loss is the average of the two means.
    """
    scale = logit_scale.exp()
    n = images.shape[0]
    image_terms, text_terms = [], []
    for i in range(n):
        row = torch.stack([scale * torch.dot(images[i], texts[j]) for j in range(n)])
        image_terms.append(-(row[i] - torch.logsumexp(row, dim=0)))
    for t in range(n):
        row = torch.stack([scale * torch.dot(texts[t], images[j]) for j in range(n)])
        text_terms.append(-(row[t] - torch.logsumexp(row, dim=0)))
    return (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2


def random_features(n, d, seed):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    return images, texts


@pytest.mark.parametrize("logit_scale", [0.0, 1.0, math.log(1 / 0.07), math.log(100.0)])
def test_matches_loop_formula(logit_scale):
    images, texts = random_features(7, 16, seed=0)
    scale = torch.tensor(logit_scale, dtype=torch.float64)
    loss = ClipLoss()(images, texts, scale)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, reference_clip_loss(images, texts, scale))


def test_logit_scale_is_log_space():
    """Passing exp(logit_scale) instead of logit_scale must give a different loss."""
    images, texts = random_features(6, 8, seed=1)
    scale = torch.tensor(2.0, dtype=torch.float64)
    loss = ClipLoss()(images, texts, scale)
    torch.testing.assert_close(loss, reference_clip_loss(images, texts, scale))
    wrong = reference_clip_loss(images, texts, torch.log(torch.tensor(2.0, dtype=torch.float64)))
    assert not torch.allclose(loss, wrong)


def test_perfectly_aligned_features_give_small_loss():
    eye = torch.eye(4, dtype=torch.float64)
    loss = ClipLoss()(eye, eye, torch.tensor(math.log(100.0), dtype=torch.float64))
    # logits: 100 on the diagonal, 0 elsewhere -> loss = log(1 + 3 e^-100) ~ 0
    assert loss.item() < 1e-30
    swapped = ClipLoss()(eye, eye.flip(0), torch.tensor(math.log(100.0), dtype=torch.float64))
    assert swapped.item() > 50


def test_loss_is_symmetric_in_swapping_modalities():
    images, texts = random_features(5, 8, seed=2)
    scale = torch.tensor(1.5, dtype=torch.float64)
    torch.testing.assert_close(ClipLoss()(images, texts, scale), ClipLoss()(texts, images, scale))


def test_gradients_match_loop_formula():
    images, texts = random_features(6, 12, seed=3)
    grads = []
    for fn in (ClipLoss(), reference_clip_loss):
        img = images.clone().requires_grad_(True)
        txt = texts.clone().requires_grad_(True)
        scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
        fn(img, txt, scale).backward()
        grads.append((img.grad, txt.grad, scale.grad))
    for got, expected in zip(*grads, strict=True):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected)


def test_gradcheck():
    images, texts = random_features(4, 6, seed=4)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ClipLoss(), (images, texts, scale))


@pytest.mark.parametrize(
    ("image_shape", "text_shape"), [((4, 8), (5, 8)), ((4, 8), (4, 6)), ((4, 8), (2, 2, 8))]
)
def test_rejects_mismatched_shapes(image_shape, text_shape):
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(torch.randn(image_shape), torch.randn(text_shape), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks, each holding one half of a fixed global batch.
#
# Math of the gradient check. Let L = ClipLoss on the whole global batch (single process) and let a
# shared linear layer W map raw features x to f = normalize(x W^T) on every rank. Rank r computes the
# local loss l_r (its B rows against the gathered global columns); mean_r l_r = L. The all_gather
# backward sums the column gradients over ranks, so the gradient that reaches rank r's own features
# is sum_s dl_s/df_r = world * dL/df_r. DDP then *averages* parameter gradients over ranks:
#     mean_r dW_r = mean_r world * sum_{rows of r} (dL/df_r)(df_r/dW) = sum_r (...) = dL/dW.
# logit_scale is not gathered, so its gradient on rank r is dl_r/ds and mean_r dl_r/ds = dL/ds.
# So we check (a) every rank returns L, (b) mean_r of the W and logit_scale gradients equal dL/dW
# and dL/ds, and
# (c) equivalently each rank's raw-feature gradient divided by world equals the slice of dL/dx.
# --------------------------------------------------------------------------------------------------

WORLD = 2
LOCAL_BATCH = 4
RAW_DIM, EMBED_DIM = 6, 5
LOGIT_SCALE = 1.3


def global_inputs():
    generator = torch.Generator().manual_seed(1234)
    raw_images = torch.randn(WORLD * LOCAL_BATCH, RAW_DIM, generator=generator, dtype=torch.float64)
    raw_texts = torch.randn(WORLD * LOCAL_BATCH, RAW_DIM, generator=generator, dtype=torch.float64)
    weight = torch.randn(EMBED_DIM, RAW_DIM, generator=generator, dtype=torch.float64)
    return raw_images, raw_texts, weight


def forward_backward(raw_images, raw_texts, weight):
    """Loss and gradients w.r.t. W, raw image features, raw text features and logit_scale."""
    w = weight.clone().requires_grad_(True)
    x_img = raw_images.clone().requires_grad_(True)
    x_txt = raw_texts.clone().requires_grad_(True)
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
    images = F.normalize(x_img @ w.T, dim=-1)
    texts = F.normalize(x_txt @ w.T, dim=-1)
    loss = ClipLoss()(images, texts, scale)
    loss.backward()
    return loss.detach(), w.grad, x_img.grad, x_txt.grad, scale.grad


def rank_results(rank: int):
    raw_images, raw_texts, weight = global_inputs()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return forward_backward(raw_images[rows], raw_texts[rows], weight)


def test_distributed_loss_and_gradients_equal_global_batch(tmp_path):
    results = gloo_world(rank_results, tmp_path, world=WORLD, timeout=60)

    raw_images, raw_texts, weight = global_inputs()
    loss, grad_w, grad_img, grad_txt, grad_scale = forward_backward(raw_images, raw_texts, weight)
    # The local batch alone gives a different loss: the check below is not vacuous.
    local_loss = forward_backward(raw_images[:LOCAL_BATCH], raw_texts[:LOCAL_BATCH], weight)[0]
    assert not torch.allclose(local_loss, loss)

    for rank in range(WORLD):
        rank_loss = results[rank][0]
        torch.testing.assert_close(rank_loss, loss, msg=f"rank {rank} loss is not the global loss")

    # (b) DDP convention: parameter gradients (W, logit_scale) averaged over ranks.
    torch.testing.assert_close(sum(results[r][1] for r in range(WORLD)) / WORLD, grad_w)
    torch.testing.assert_close(sum(results[r][4] for r in range(WORLD)) / WORLD, grad_scale)

    # (c) per-rank feature gradients are world * the slice of the global-loss gradient.
    for rank in range(WORLD):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(results[rank][2] / WORLD, grad_img[rows])
        torch.testing.assert_close(results[rank][3] / WORLD, grad_txt[rows])
