"""Tests for the auxiliary self-supervised losses (SimCLR, SimSiam, BYOL) and the MLP head."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aclip.modules.losses as losses_module
from aclip.modules.heads import MLPHead
from aclip.modules.losses import BYOLLoss, SimCLRLoss, SimSiamLoss
from tests.helpers import gloo_world

# --------------------------------------------------------------------------------------------------
# References, written independently of the code under test.
# --------------------------------------------------------------------------------------------------


def reference_nt_xent(view1, view2, temperature):
    """SimCLR's NT-Xent on the 2N x 2N matrix of z = [z1; z2] (all first views, then all second views).

    l(i, j) = -log( exp(s_ij) / sum_{m != i} exp(s_im) ), s = cos / temperature, j the other view of i's
    image; the loss is the mean of l over the 2N anchors.
    """
    z = F.normalize(torch.cat([view1, view2]), dim=-1)
    n = view1.shape[0]
    terms = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.stack([torch.dot(z[i], z[m]) / temperature for m in range(2 * n) if m != i])
        terms.append(-(torch.dot(z[i], z[j]) / temperature - torch.logsumexp(others, dim=0)))
    return torch.stack(terms).mean()


def reference_multiview(views, temperature, include_self=False):
    """The documented multi-view formula, by loops over (anchor, positive) pairs.

    Anchor (b, v), positive (b, w) with w != v: -s + log sum over every (c, u) != (b, v) of exp(s);
    mean over all anchor-positive pairs. `include_self=True` is the wrong variant that keeps the anchor's
    similarity with itself in the denominator.
    """
    n, k, _ = views.shape
    z = F.normalize(views, dim=-1)
    terms = []
    for b in range(n):
        for v in range(k):
            denominator = torch.stack(
                [
                    torch.dot(z[b, v], z[c, u]) / temperature
                    for c in range(n)
                    for u in range(k)
                    if include_self or (c, u) != (b, v)
                ]
            )
            for w in range(k):
                if w != v:
                    positive = torch.dot(z[b, v], z[b, w]) / temperature
                    terms.append(-(positive - torch.logsumexp(denominator, dim=0)))
    return torch.stack(terms).mean()


def buggy_self_positive_loss(views, temperature):
    """The published code's defect: the view is compared with ITSELF (anchor = positive = view 1)."""
    z1 = F.normalize(views[:, 0], dim=-1)
    logits = z1 @ z1.T / temperature
    return F.cross_entropy(logits, torch.arange(views.shape[0]))


def random_views(n, k, d, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, d, generator=generator, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# SimCLR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_k2_equals_standard_nt_xent(temperature):
    views = random_views(6, 2, 8, seed=0)
    loss = SimCLRLoss(temperature)(views)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, reference_nt_xent(views[:, 0], views[:, 1], temperature))


def test_simclr_normalises_inside():
    views = random_views(5, 2, 8, seed=1)
    scale = torch.tensor([0.1, 3.0, 7.0, 0.5, 2.0], dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(SimCLRLoss()(views * scale), SimCLRLoss()(views))


def test_simclr_identical_views_give_lower_loss():
    views = random_views(8, 2, 16, seed=2)
    identical = views.clone()
    identical[:, 1] = identical[:, 0]
    loss_identical, loss_different = SimCLRLoss()(identical), SimCLRLoss()(views)
    assert loss_identical < loss_different - 1.0


def test_simclr_is_not_the_self_comparison_bug():
    """A loss with the view itself as positive ignores view 2 entirely; ours must depend on it."""
    views = random_views(8, 2, 16, seed=3)
    changed = views.clone()
    changed[:, 1] = random_views(8, 1, 16, seed=4)[:, 0]
    # The buggy variant is blind to the second view ...
    torch.testing.assert_close(buggy_self_positive_loss(views, 0.1), buggy_self_positive_loss(changed, 0.1))
    # ... ours is not, and is not the buggy value.
    assert not torch.allclose(SimCLRLoss()(views), SimCLRLoss()(changed))
    assert not torch.allclose(SimCLRLoss()(views), buggy_self_positive_loss(views, 0.1))


def test_simclr_excludes_anchor_self_similarity(monkeypatch):
    """Adding anything to the anchor-self logits changes nothing (they are masked to -inf)."""
    views = random_views(5, 3, 8, seed=5)
    expected = SimCLRLoss()(views)
    # The variant that keeps exp(s_ii) in the denominator is measurably different ...
    with_self = reference_multiview(views, 0.1, include_self=True)
    assert (with_self - expected).abs() > 1e-3
    torch.testing.assert_close(expected, reference_multiview(views, 0.1))

    # ... and perturbing the diagonal of the logits the loss normalises has no effect.
    calls = []

    def perturbed_log_softmax(logits, dim):
        calls.append(logits.shape)
        rows = torch.arange(logits.shape[0])
        bumped = logits.clone()
        bumped[rows, rows] = bumped[rows, rows] * 10 + 50  # single process: self of row i is column i
        return F.log_softmax(bumped, dim=dim)

    fake_functional = types.SimpleNamespace(normalize=F.normalize, log_softmax=perturbed_log_softmax)
    monkeypatch.setattr(losses_module, "F", fake_functional)
    torch.testing.assert_close(SimCLRLoss()(views), expected)
    assert calls, "the hook was not exercised: update this test if the implementation changed"


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_k3_matches_documented_formula(temperature):
    views = random_views(4, 3, 8, seed=6)
    torch.testing.assert_close(SimCLRLoss(temperature)(views), reference_multiview(views, temperature))


def test_simclr_multiview_formula_reduces_to_nt_xent_for_k2():
    views = random_views(5, 2, 8, seed=7)
    torch.testing.assert_close(
        reference_multiview(views, 0.2), reference_nt_xent(views[:, 0], views[:, 1], 0.2)
    )


@pytest.mark.parametrize("k", [2, 3])
def test_simclr_gradients_flow_to_every_view(k):
    views = random_views(4, k, 8, seed=8).requires_grad_(True)
    SimCLRLoss()(views).backward()
    assert torch.isfinite(views.grad).all()
    assert (views.grad.norm(dim=-1) > 0).all()


def test_simclr_gradcheck():
    views = random_views(3, 3, 4, seed=9).requires_grad_(True)
    assert torch.autograd.gradcheck(SimCLRLoss(0.5), (views,))


def test_losses_compute_in_float32_under_autocast():
    """Half-precision inputs and autocast: similarities in float32 (temperature 0.1 magnifies rounding)."""
    views = random_views(8, 2, 64, seed=22).float()
    targets = random_views(8, 1, 64, seed=23)[:, 0].float()
    expected = (SimCLRLoss()(views), SimSiamLoss()(views, views.flip(1)), BYOLLoss()(views, targets))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (SimCLRLoss()(views), SimSiamLoss()(views, views.flip(1)), BYOLLoss()(views, targets))
    for loss, reference in zip(got, expected, strict=True):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, reference)
    half = SimCLRLoss()(views.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, SimCLRLoss()(views.bfloat16().float()))


@pytest.mark.parametrize("shape", [(4, 8), (4, 1, 8), (0, 2, 8), (2, 2, 2, 8)])
def test_simclr_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"\[B, k, D\]"):
        SimCLRLoss()(torch.randn(shape))


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_simclr_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SimCLRLoss(temperature)


# --------------------------------------------------------------------------------------------------
# SimCLR across 2 gloo ranks, each holding one half of a fixed global batch (same math as the ClipLoss
# test in test_losses.py): every rank returns the global loss L; the all_gather backward sums over
# ranks, so the gradient reaching rank r's raw rows is world * dL/dx_r; DDP averages the gradients of
# the shared linear layer, mean_r dW_r = dL/dW.
# --------------------------------------------------------------------------------------------------

WORLD = 2
LOCAL_BATCH = 3
RAW_DIM, EMBED_DIM = 6, 5
VIEW_COUNTS = (2, 3)


def global_inputs(k):
    generator = torch.Generator().manual_seed(100 + k)
    raw = torch.randn(WORLD * LOCAL_BATCH, k, RAW_DIM, generator=generator, dtype=torch.float64)
    weight = torch.randn(EMBED_DIM, RAW_DIM, generator=generator, dtype=torch.float64)
    return raw, weight


def forward_backward(raw, weight):
    """SimCLR loss of (raw @ W^T) and its gradients w.r.t. W and the raw features."""
    w = weight.clone().requires_grad_(True)
    x = raw.clone().requires_grad_(True)
    loss = SimCLRLoss(0.5)(x @ w.T)
    loss.backward()
    return loss.detach(), w.grad, x.grad


def rank_results(rank: int):
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for k in VIEW_COUNTS:
        raw, weight = global_inputs(k)
        results[k] = forward_backward(raw[rows], weight)
    return results


def test_simclr_distributed_loss_and_gradients_equal_global_batch(tmp_path):
    results = gloo_world(rank_results, tmp_path, world=WORLD, timeout=60)

    for k in VIEW_COUNTS:
        raw, weight = global_inputs(k)
        loss, grad_w, grad_x = forward_backward(raw, weight)
        local_loss = forward_backward(raw[:LOCAL_BATCH], weight)[0]
        assert not torch.allclose(local_loss, loss), "the check below would be vacuous"
        for rank in range(WORLD):
            torch.testing.assert_close(
                results[rank][k][0], loss, msg=f"k={k} rank {rank}: not the global loss"
            )
        torch.testing.assert_close(sum(results[r][k][1] for r in range(WORLD)) / WORLD, grad_w)
        for rank in range(WORLD):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            torch.testing.assert_close(results[rank][k][2] / WORLD, grad_x[rows])


# --------------------------------------------------------------------------------------------------
# SimSiam
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_simsiam_perfect_alignment_is_minus_one(k):
    direction = random_views(4, 1, 8, seed=10)
    scales = torch.rand(4, k, 1, dtype=torch.float64) + 0.5
    predictions = direction * scales
    projections = direction * scales.flip(1) * 3
    torch.testing.assert_close(
        SimSiamLoss()(predictions, projections), torch.tensor(-1.0, dtype=torch.float64)
    )


def test_simsiam_k2_is_symmetrised_negative_cosine():
    p, z = random_views(5, 2, 8, seed=11), random_views(5, 2, 8, seed=12)
    expected = (
        -(
            F.cosine_similarity(p[:, 0], z[:, 1], dim=-1).mean()
            + F.cosine_similarity(p[:, 1], z[:, 0], dim=-1).mean()
        )
        / 2
    )
    torch.testing.assert_close(SimSiamLoss()(p, z), expected)


def test_simsiam_k3_averages_ordered_pairs_of_different_views():
    p, z = random_views(4, 3, 8, seed=13), random_views(4, 3, 8, seed=14)
    terms = [
        -F.cosine_similarity(p[b, v], z[b, w], dim=0)
        for b in range(4)
        for v in range(3)
        for w in range(3)
        if v != w
    ]
    torch.testing.assert_close(SimSiamLoss()(p, z), torch.stack(terms).mean())


def test_simsiam_stop_gradient():
    predictions = random_views(4, 2, 8, seed=15).requires_grad_(True)
    projections = random_views(4, 2, 8, seed=16).requires_grad_(True)
    SimSiamLoss()(predictions, projections).backward()
    assert projections.grad is None
    assert predictions.grad is not None and predictions.grad.abs().sum() > 0


def test_simsiam_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        SimSiamLoss()(torch.randn(4, 2, 8), torch.randn(4, 2, 6))
    with pytest.raises(ValueError, match=r"\[B, k, D\]"):
        SimSiamLoss()(torch.randn(4, 1, 8), torch.randn(4, 1, 8))


# --------------------------------------------------------------------------------------------------
# BYOL
# --------------------------------------------------------------------------------------------------


def test_byol_identical_and_opposite_directions():
    targets = random_views(5, 1, 8, seed=17)[:, 0]
    scales = torch.rand(5, 3, 1, dtype=torch.float64) + 0.5
    same = targets[:, None, :] * scales
    zero, four = torch.tensor(0.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    torch.testing.assert_close(BYOLLoss()(same, targets * 2), zero)
    torch.testing.assert_close(BYOLLoss()(-same, targets), four)


def test_byol_value_by_hand():
    predictions = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [1, 2, 2]
    targets = torch.tensor([[1.0, 1.0]])
    # cos = 1/sqrt(2) for both views -> 2 - 2/sqrt(2) = 2 - sqrt(2)
    torch.testing.assert_close(BYOLLoss()(predictions, targets), torch.tensor(2 - math.sqrt(2)))
    p, t = random_views(4, 2, 8, seed=18), random_views(4, 1, 8, seed=19)[:, 0]
    expected = torch.stack(
        [2 - 2 * F.cosine_similarity(p[b, v], t[b], dim=0) for b in range(4) for v in range(2)]
    )
    torch.testing.assert_close(BYOLLoss()(p, t), expected.mean())


def test_byol_no_gradient_to_targets():
    predictions = random_views(4, 2, 8, seed=20).requires_grad_(True)
    targets = random_views(4, 1, 8, seed=21)[:, 0].requires_grad_(True)
    BYOLLoss()(predictions, targets).backward()
    assert targets.grad is None
    assert predictions.grad is not None and predictions.grad.abs().sum() > 0


@pytest.mark.parametrize(("p_shape", "t_shape"), [((4, 2, 8), (4, 6)), ((4, 2, 8), (3, 8)), ((4, 8), (4, 8))])
def test_byol_rejects_bad_shapes(p_shape, t_shape):
    with pytest.raises(ValueError):
        BYOLLoss()(torch.randn(p_shape), torch.randn(t_shape))


# --------------------------------------------------------------------------------------------------
# MLPHead
# --------------------------------------------------------------------------------------------------

NORM_TYPES = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d, "sync_batch": nn.SyncBatchNorm, "none": None}


@pytest.mark.parametrize("norm", list(NORM_TYPES))
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_mlp_head_structure_and_shapes(norm, num_layers):
    head = MLPHead(12, hidden_dim=32, out_dim=7, num_layers=num_layers, norm=norm)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == num_layers
    assert (linears[0].in_features, linears[-1].out_features) == (12, 7)
    expected_norm = NORM_TYPES[norm]
    norms = [m for m in head.modules() if expected_norm is not None and type(m) is expected_norm]
    assert len(norms) == (num_layers - 1 if expected_norm else 0)
    # No norm and no activation after the last linear layer.
    assert head.net[-1] is linears[-1]
    assert head(torch.randn(6, 12)).shape == (6, 7)
    assert head(torch.randn(3, 2, 12)).shape == (3, 2, 7)


def test_mlp_head_leading_dims_are_one_batch_for_batch_norm():
    torch.manual_seed(0)
    head = MLPHead(8, hidden_dim=16, out_dim=4, num_layers=3, norm="batch")
    x = torch.randn(4, 3, 8)
    torch.testing.assert_close(head(x), head(x.reshape(12, 8)).reshape(4, 3, 4))


def test_mlp_head_relu_activation():
    head = MLPHead(8, hidden_dim=16, out_dim=4, num_layers=2, activation="relu")
    assert any(isinstance(m, nn.ReLU) for m in head.modules())
    assert not any(isinstance(m, nn.GELU) for m in head.modules())


def test_layer_norm_head_works_with_batch_one_in_train_mode_batch_norm_does_not():
    x = torch.randn(1, 8)
    layer = MLPHead(8, hidden_dim=16, out_dim=4, norm="layer").train()
    assert torch.isfinite(layer(x)).all()
    for norm in ("batch", "sync_batch"):  # per-feature statistics of one sample are undefined
        head = MLPHead(8, hidden_dim=16, out_dim=4, norm=norm).train()
        with pytest.raises(ValueError, match="more than 1 value"):
            head(x)
        head.eval()
        assert head(x).shape == (1, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_dim": 0},
        {"in_dim": 8, "hidden_dim": 0},
        {"in_dim": 8, "out_dim": -1},
        {"in_dim": 8, "num_layers": 0},
        {"in_dim": 8, "num_layers": 2.0},
        {"in_dim": 8, "norm": "group"},
        {"in_dim": 8, "activation": "tanh"},
    ],
)
def test_mlp_head_rejects_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        MLPHead(**kwargs)


def test_mlp_head_rejects_wrong_input_width():
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        MLPHead(8, hidden_dim=16, out_dim=4)(torch.randn(2, 6))
