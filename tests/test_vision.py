"""Tests for the timm ViT vision tower with token removal."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.layers import Attention
from timm.models import VisionTransformer

from aclip.modules.vision import ConvStem, VisionTower, keep_tokens

PATCH = 8


def make_tower(image_size=32, **kwargs):
    torch.manual_seed(0)
    options = {"patch_size": PATCH, "width": 32, "depth": 2, "heads": 2, "output_dim": 16}
    options.update(kwargs)
    return VisionTower(image_size=image_size, **options).eval()


def images(batch=2, height=32, width=32, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def reference_forward(tower, x, keep):
    """The intended computation, assembled by hand from the trunk's pieces."""
    trunk = tower.trunk
    tokens = trunk._pos_embed(trunk.patch_embed(tower.normalize_pixels(x)))
    cls, patches = tokens[:, :1], tokens[:, 1:]
    kept = torch.stack([patches[b, keep[b]] for b in range(x.shape[0])])
    tokens = torch.cat([cls, kept], dim=1)
    for block in trunk.blocks:
        tokens = block(tokens)
    return tower.proj(trunk.norm(tokens)[:, 0])


def test_trunk_is_timm_vision_transformer():
    tower = make_tower()
    assert isinstance(tower.trunk, VisionTransformer)
    assert len(tower.trunk.blocks) == 2
    assert tower.trunk.embed_dim == 32


def test_output_shape():
    tower = make_tower()
    with torch.no_grad():
        out = tower(images(batch=3))
    assert out.shape == (3, 16)
    assert torch.isfinite(out).all()


def test_grid():
    tower = make_tower()
    assert tower.grid(32, 32) == (4, 4)
    assert tower.grid(48, 64) == (6, 8)
    assert tower.grid(40) == (5, 5)


def test_keep_none_equals_keep_all():
    tower = make_tower()
    x = images()
    keep_all = torch.arange(16).expand(2, -1).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(tower(x), tower(x, keep_all))
        # ... and both equal the hand-built reference on all tokens.
        torch.testing.assert_close(tower(x), reference_forward(tower, x, keep_all))


def test_keep_subset_matches_reference_and_differs_from_full():
    tower = make_tower()
    x = images()
    keep = torch.tensor([[0, 3, 5, 10, 15], [1, 2, 7, 8, 12]])
    with torch.no_grad():
        out = tower(x, keep)
        torch.testing.assert_close(out, reference_forward(tower, x, keep))
        assert not torch.allclose(out, tower(x), atol=1e-4)


def test_tokens_entering_blocks_are_cls_plus_kept():
    """Fewer tokens enter every block: the first block sees 1 + n_keep tokens."""
    tower = make_tower()
    seen = []
    hooks = [
        b.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
        for b in tower.trunk.blocks
    ]
    keep = torch.tensor([[0, 4, 9], [2, 3, 14]])
    with torch.no_grad():
        tower(images(), keep)
    for hook in hooks:
        hook.remove()
    assert seen == [4, 4]


def test_dropped_patch_pixels_do_not_matter():
    """Changing only a dropped patch leaves the output unchanged; changing a kept patch does not."""
    tower = make_tower()
    x = images(batch=1)
    # Grid 4x4 with patch 8. Keep patches 0, 5, 6, 15; patch 1 (row 0, col 1) is dropped.
    keep = torch.tensor([[0, 5, 6, 15]])
    with torch.no_grad():
        base = tower(x, keep)
        dropped = x.clone()
        dropped[..., 0:8, 8:16] = torch.randn(3, 8, 8) * 5  # patch 1
        torch.testing.assert_close(tower(dropped, keep), base)
        kept = x.clone()
        kept[..., 8:16, 8:16] = torch.randn(3, 8, 8) * 5  # patch 5 (row 1, col 1)
        assert not torch.allclose(tower(kept, keep), base, atol=1e-4)
        # Sanity: with all tokens, the dropped patch does matter.
        assert not torch.allclose(tower(dropped), tower(x), atol=1e-4)


@pytest.mark.parametrize(("height", "width"), [(48, 64), (64, 32), (16, 16)])
def test_other_image_sizes_interpolate_position_embeddings(height, width):
    tower = make_tower(image_size=32)
    x = images(height=height, width=width)
    gh, gw = tower.grid(height, width)
    assert (gh, gw) == (height // PATCH, width // PATCH)
    with torch.no_grad():
        out = tower(x)
        assert out.shape == (2, 16)
        assert torch.isfinite(out).all()
        tokens = tower.embed(x)
        assert tokens.shape == (2, 1 + gh * gw, 32)
        # The patch tokens carry position embeddings resampled to the input grid.
        patches = tower.trunk.patch_embed(tower.normalize_pixels(x)).reshape(2, gh * gw, 32)
        pos = tower.trunk.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        resized = F.interpolate(pos, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        resized = resized.permute(0, 2, 3, 1).reshape(1, gh * gw, 32)
        torch.testing.assert_close(tokens[:, 1:] - patches, resized.expand(2, -1, -1), atol=1e-5, rtol=1e-4)
        keep = torch.tensor([[0, gh * gw - 1], [1, 2]])
        torch.testing.assert_close(tower(x, keep), reference_forward(tower, x, keep))


def test_fused_attention_is_used(monkeypatch):
    tower = make_tower()
    attentions = [m for m in tower.trunk.modules() if isinstance(m, Attention)]
    assert len(attentions) == 2
    assert all(m.fused_attn for m in attentions)

    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    keep = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with torch.no_grad():
        tower(images(), keep)
    assert len(calls) == 2
    assert all(shape[2] == 4 for shape in calls)  # [B, heads, 1 + n_keep, head_dim]


def test_fused_attention_forced_even_when_timm_disables_it(monkeypatch):
    """TIMM_FUSED_ATTN=0 would make timm choose the unfused path; the tower overrides it."""
    import timm.layers.attention as timm_attention

    monkeypatch.setattr(timm_attention, "use_fused_attn", lambda *a, **k: False)
    tower = make_tower()
    assert all(m.fused_attn for m in tower.trunk.modules() if isinstance(m, Attention))


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple"):
        VisionTower(image_size=36, patch_size=8, width=32, depth=1, heads=2, output_dim=16)
    with pytest.raises(ValueError, match="divisible"):
        VisionTower(image_size=32, patch_size=8, width=30, depth=1, heads=4, output_dim=16)


def test_gradients_flow_only_through_kept_tokens():
    tower = make_tower()
    x = images(batch=1).requires_grad_(True)
    keep = torch.tensor([[0, 5, 6, 15]])
    tower(x, keep).sum().backward()
    grad = x.grad[0].abs().sum(0)  # [32, 32]
    assert grad[0:8, 8:16].sum() == 0  # patch 1 dropped
    assert grad[8:16, 8:16].sum() > 0  # patch 5 kept
    assert tower.proj.weight.grad is not None


def test_keep_tokens_selects_prefix_and_indexed_patches():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 CLS + 4 patches
    keep = torch.tensor([[0, 3], [2, 1]])
    out = keep_tokens(tokens, keep)
    expected = torch.stack(
        [
            torch.stack([tokens[0, 0], tokens[0, 1], tokens[0, 4]]),
            torch.stack([tokens[1, 0], tokens[1, 3], tokens[1, 2]]),
        ]
    )
    torch.testing.assert_close(out, expected)
    two_prefix = keep_tokens(tokens, torch.tensor([[0], [2]]), num_prefix_tokens=2)
    torch.testing.assert_close(two_prefix[:, :2], tokens[:, :2])
    torch.testing.assert_close(two_prefix[:, 2], torch.stack([tokens[0, 2], tokens[1, 4]]))


@pytest.mark.parametrize(
    "keep",
    [
        torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),  # not long
        torch.tensor([[0, 1], [2, 3]], dtype=torch.float32),  # not long
        torch.tensor([[0, 1]]),  # wrong batch
        torch.tensor([0, 1]),  # 1-D
    ],
)
def test_keep_tokens_rejects_bad_keep(keep):
    tokens = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="keep"):
        keep_tokens(tokens, keep)


def test_forward_rejects_bad_keep():
    tower = make_tower()
    with pytest.raises(ValueError):
        tower(images(), torch.tensor([[0, 1, 2]]))


def test_weight_init_chooses_timms_initialisation():
    """weight_init "" keeps timm's std-0.02 linear layers (A-CLIP's); "jax" gives Xavier's, ~6x wider."""
    default, jax = make_tower().trunk.blocks[0], make_tower(weight_init="jax").trunk.blocks[0]
    assert default.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    xavier = (2 / (32 + 96)) ** 0.5
    assert jax.attn.qkv.weight.std().item() == pytest.approx(xavier, rel=0.1)
    assert jax.mlp.fc1.weight.std().item() == pytest.approx((2 / (32 + 128)) ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="weight_init must be one of"):
        make_tower(weight_init="xavier")


def test_weight_init_switch_reaches_the_tower(train_config):
    module = instantiate(train_config("model.vision.weight_init=moco").model)
    assert module.model.vision.trunk.weight_init_mode == "moco"
    assert instantiate(train_config().model).model.vision.trunk.weight_init_mode == "jax"  # tiny's


# --- The convolutional stem: non-linear patch tokens on ViT's grid, so token removal works as before.


def test_conv_stem_replaces_the_patch_projection_on_the_same_grid():
    tower = make_tower(stem="conv")
    stem = tower.trunk.patch_embed.proj
    assert isinstance(stem, ConvStem) and make_tower().stem == "patch"
    convolutions = [layer for layer in stem if isinstance(layer, torch.nn.Conv2d)]
    # log2(8) = 3 stride-2 3x3 convolutions, channels doubling up to the width, then a 1x1 one.
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convolutions] == [
        (8, (3, 3), (2, 2)),
        (16, (3, 3), (2, 2)),
        (32, (3, 3), (2, 2)),
        (32, (1, 1), (1, 1)),
    ]
    x = images()
    with torch.no_grad():
        assert tower.embed(x).shape == make_tower().embed(x).shape == (2, 1 + 16, 32)
        assert tower.cls_attention(x).shape == (2, 16)
        assert tower.grid(48, 64) == (6, 8) and tower(images(height=48, width=64)).shape == (2, 16)
        # Its tokens are not linear in the pixels, as a patch projection's are.
        assert not torch.allclose(tower.embed(2 * x) - tower.embed(x), tower.embed(x) - tower.embed(0 * x))


def test_conv_stem_tokens_are_removed_as_the_patch_projections():
    tower = make_tower(stem="conv")
    x = images()
    keep = torch.tensor([[0, 3, 5, 10, 15], [1, 2, 7, 8, 12]])
    with torch.no_grad():
        torch.testing.assert_close(tower(x, keep), reference_forward(tower, x, keep))
        assert not torch.allclose(tower(x, keep), tower(x), atol=1e-4)
        # A dropped patch away from every kept one is not seen (its border pixels reach the neighbours).
        lone = torch.tensor([[0, 1, 4, 5]])  # the top-left 2 x 2 patches; patch 15 (bottom right) dropped
        changed = x[:1].clone()
        changed[..., 24:32, 24:32] = torch.randn(3, 8, 8) * 5
        torch.testing.assert_close(tower(changed, lone), tower(x[:1], lone))
        features, scores = tower.forward_with_cls_attention(x)  # the teacher's pass
        torch.testing.assert_close(features, tower(x))
        assert scores.shape == (2, 16)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stem": "convnext"}, "stem must be one of"),
        ({"stem": "conv", "patch_size": 6, "image_size": 36}, "power of 2"),
        ({"stem": "conv", "freeze_patch_embed": True}, "replaces that projection"),
    ],
)
def test_conv_stem_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        make_tower(**options)


def test_stem_switch_reaches_the_towers_and_trains_the_stem(train_config):
    module = instantiate(train_config("model.vision.stem=conv").model)
    assert isinstance(module.model.vision.trunk.patch_embed.proj, ConvStem)
    assert isinstance(module.ema_model.vision.trunk.patch_embed.proj, ConvStem)  # the teacher's too
    assert all(p.requires_grad for p in module.model.vision.trunk.patch_embed.parameters())
