"""CLS-attention scores of the vision tower, checked against the full attention matrices of its blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from aclip.modules.vision import VisionTower, _block_with_cls_attention

PATCH = 8
DEPTH = 3


def make_tower(image_size=32, **kwargs):
    """A three-block tower whose attention is far from uniform, so that scores differ across layers."""
    torch.manual_seed(0)
    options = {"patch_size": PATCH, "width": 32, "depth": DEPTH, "heads": 2, "output_dim": 16}
    options.update(kwargs)
    tower = VisionTower(image_size=image_size, **options)
    with torch.no_grad():
        for block in tower.trunk.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.4)
            block.attn.qkv.bias.normal_(0.0, 0.2)
    return tower.eval()


def images(batch=2, height=32, width=32, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def full_attention_cls_row(block, x):
    """Mean over heads of softmax(q k^T * scale) over all N tokens, CLS query row, patch columns."""
    attn = block.attn
    h = block.norm1(x)
    batch, length, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    matrix = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # [B, heads, N, N]
    return matrix[:, :, 0, 1:].mean(dim=1)


def reference_scores(tower, x, layers):
    """Per-block CLS rows from the full attention matrices, averaged over `layers` (block indices)."""
    trunk = tower.trunk
    tokens = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(tower.normalize_pixels(x))))
    per_block = []
    for block in trunk.blocks:
        per_block.append(full_attention_cls_row(block, tokens))
        tokens = block(tokens)
    return torch.stack([per_block[i] for i in layers]).mean(dim=0), per_block


@pytest.mark.parametrize(
    ("layers", "indices"),
    [("all", [0, 1, 2]), ("last", [2]), ([0, 2], [0, 2]), ([-1], [2]), ([1], [1])],
)
def test_scores_equal_full_attention_matrix_reference(layers, indices):
    tower = make_tower()
    x = images()
    with torch.no_grad():
        expected, _ = reference_scores(tower, x, indices)
        scores = tower.cls_attention(x, layers=layers)
    assert scores.shape == (2, 16)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_reference_layers_really_differ():
    """Guard for the test above: the blocks' CLS rows differ, so choosing the wrong layers is caught."""
    tower = make_tower()
    with torch.no_grad():
        _, per_block = reference_scores(tower, images(), [0])
    for i in range(DEPTH):
        for j in range(i + 1, DEPTH):
            assert (per_block[i] - per_block[j]).abs().max() > 1e-3
    assert per_block[0].std(dim=1).min() > 1e-3  # not uniform attention


def test_default_layers_are_all():
    tower = make_tower()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(tower.cls_attention(x), tower.cls_attention(x, layers="all"))
        assert not torch.allclose(tower.cls_attention(x), tower.cls_attention(x, layers="last"), atol=1e-4)


@pytest.mark.parametrize("layers", ["all", "last", [0, 2], [-1]])
def test_forward_with_cls_attention_features_equal_plain_forward(layers):
    tower = make_tower()
    x = images()
    with torch.no_grad():
        features, scores = tower.forward_with_cls_attention(x, layers=layers)
        torch.testing.assert_close(features, tower(x))
        torch.testing.assert_close(scores, tower.cls_attention(x, layers=layers))
    assert features.shape == (2, 16)


def test_non_square_image_scores_shape_and_values():
    tower = make_tower()
    x = images(batch=3, height=32, width=48)
    gh, gw = tower.grid(32, 48)
    assert (gh, gw) == (4, 6)
    with torch.no_grad():
        features, scores = tower.forward_with_cls_attention(x)
        expected, _ = reference_scores(tower, x, range(DEPTH))
    assert scores.shape == (3, gh * gw)
    assert features.shape == (3, 16)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_scores_sum_below_one_and_positive():
    """Softmax over CLS and patches: the patches share less than 1, CLS takes the rest."""
    tower = make_tower()
    with torch.no_grad():
        for layers in ("all", "last", [0]):
            scores = tower.cls_attention(images(batch=4), layers=layers)
            total = scores.sum(dim=1)
            assert (scores >= 0).all()
            assert (total > 0).all() and (total < 1).all()
        # Per block, the CLS query's own weight is exactly what the patches leave.
        x = images(batch=4)
        trunk = tower.trunk
        tokens = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(tower.normalize_pixels(x))))
        _, scores = _block_with_cls_attention(trunk.blocks[0], tokens, 1)
        attn = trunk.blocks[0].attn
        h = trunk.blocks[0].norm1(tokens)
        q, k, _ = attn.qkv(h).reshape(4, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        cls_self = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)[:, :, 0, 0].mean(dim=1)
        torch.testing.assert_close(scores.sum(dim=1) + cls_self, torch.ones(4))


# --------------------------------------------------------------------------------------------------
# resolve_layers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ("all", [0, 1, 2]),
        ("last", [2]),
        ([0, 2], [0, 2]),
        ([2, 0], [0, 2]),
        ([-1], [2]),
        ([-3, 1], [0, 1]),
        ([2, -1], [2]),
        ((1,), [1]),
    ],
)
def test_resolve_layers(layers, expected):
    assert make_tower().resolve_layers(layers) == expected


@pytest.mark.parametrize("layers", [[3], [-4], [0, 7], [], (), "first", "ALL", "0", ""])
def test_resolve_layers_rejects(layers):
    tower = make_tower()
    with pytest.raises(ValueError, match="layers"):
        tower.resolve_layers(layers)
    with pytest.raises(ValueError, match="layers"):
        tower.cls_attention(images(), layers=layers)


def test_resolve_layers_rejects_non_integer_index():
    tower = make_tower()
    with pytest.raises(ValueError, match="layers"):
        tower.resolve_layers([0.5])


# --------------------------------------------------------------------------------------------------
# _block_with_cls_attention
# --------------------------------------------------------------------------------------------------


def block_input(tower, x):
    trunk = tower.trunk
    return trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x)))


def test_block_with_cls_attention_output_equals_block_forward_eval():
    tower = make_tower()
    tokens = block_input(tower, images())
    with torch.no_grad():
        for block in tower.trunk.blocks:
            out, scores = _block_with_cls_attention(block, tokens, 1)
            torch.testing.assert_close(out, block(tokens))
            torch.testing.assert_close(scores, full_attention_cls_row(block, tokens), rtol=1e-4, atol=1e-6)
            tokens = out


def test_block_with_cls_attention_in_train_mode_without_drop_path():
    tower = make_tower(drop_path_rate=0.0).train()
    assert tower.trunk.blocks[0].training
    x = images()
    tokens = block_input(tower, x)
    out, scores = _block_with_cls_attention(tower.trunk.blocks[0], tokens, 1)
    torch.testing.assert_close(out, tower.trunk.blocks[0](tokens))
    torch.testing.assert_close(
        scores, full_attention_cls_row(tower.trunk.blocks[0], tokens), rtol=1e-4, atol=1e-6
    )
    # The whole tower in train mode: same features as the plain forward, gradients flow.
    features, scores = tower.forward_with_cls_attention(x)
    torch.testing.assert_close(features, tower(x))
    features.sum().backward()
    assert tower.trunk.blocks[0].attn.qkv.weight.grad is not None


def test_block_with_cls_attention_follows_qk_norm_layer_scale_scale_norm_and_gate():
    """A timm Block with every optional piece switched on: the output is still `block(x)`."""
    torch.manual_seed(0)
    block = Block(32, num_heads=4, qkv_bias=True, qk_norm=True, scale_attn_norm=True, init_values=0.5)
    block.attn.gate = nn.Linear(32, 32)
    with torch.no_grad():
        block.attn.qkv.weight.normal_(0.0, 0.4)
    block.eval()
    tokens = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, scores = _block_with_cls_attention(block, tokens, 1)
        torch.testing.assert_close(out, block(tokens))
        torch.testing.assert_close(scores, full_attention_cls_row(block, tokens), rtol=1e-4, atol=1e-6)
    assert scores.shape == (3, 8)


def test_block_with_cls_attention_excludes_all_prefix_tokens():
    tower = make_tower()
    tokens = block_input(tower, images())
    block = tower.trunk.blocks[0]
    with torch.no_grad():
        _, one = _block_with_cls_attention(block, tokens, 1)
        _, two = _block_with_cls_attention(block, tokens, 2)
    assert two.shape == (2, 15)
    torch.testing.assert_close(two, one[:, 1:])


# --------------------------------------------------------------------------------------------------
# Fused attention for every row, only the CLS row explicit
# --------------------------------------------------------------------------------------------------


def test_fused_attention_still_runs_for_all_rows(monkeypatch):
    tower = make_tower()
    x = images(height=32, width=48)  # N = 1 + 4 * 6 tokens
    calls = []
    original = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    for layers, expected_calls in (("all", DEPTH), ("last", DEPTH), ([0], DEPTH)):
        calls.clear()
        with torch.no_grad():
            tower.forward_with_cls_attention(x, layers=layers)
        assert len(calls) == expected_calls, layers
        # Every query row (not only CLS) goes through the fused kernel.
        assert all(q == (2, 2, 25, 16) and k == (2, 2, 25, 16) for q, k in calls)


class OutputShapes(TorchDispatchMode):
    """Records the name and output shapes of every aten op run inside the context."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, tuple | list) else [out]
        self.ops.append((str(func), [tuple(o.shape) for o in outputs if isinstance(o, torch.Tensor)]))
        return out


@pytest.mark.parametrize("layers", ["all", "last"])
def test_no_n_by_n_attention_matrix_is_materialised(layers):
    tower = make_tower()
    x = images(height=32, width=48)
    tokens = 25
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), OutputShapes() as recorder:
        scores = tower.cls_attention(x, layers=layers)
    assert scores.shape == (2, 24)
    assert any("scaled_dot_product" in name for name, _ in recorder.ops)
    softmaxes = [shapes for name, shapes in recorder.ops if "softmax" in name]
    assert softmaxes and all(shape[-2] == 1 for shapes in softmaxes for shape in shapes)
    square = [
        (name, shape) for name, shapes in recorder.ops for shape in shapes if shape[-2:] == (tokens, tokens)
    ]
    assert not square
