"""Tests for ClipModel: normalised embeddings and the clamped log temperature."""

import math

import pytest
import torch

from aclip.modules.losses import ClipLoss
from aclip.modules.model import ClipModel
from aclip.modules.text import TextTower
from aclip.modules.vision import VisionTower

CONTEXT, EMBED = 8, 16


def make_model(**kwargs):
    torch.manual_seed(0)
    vision = VisionTower(image_size=32, patch_size=8, width=32, depth=1, heads=2, output_dim=EMBED)
    text = TextTower(context_length=CONTEXT, width=32, heads=2, layers=1, output_dim=EMBED)
    return ClipModel(vision, text, **kwargs)


def batch(n=3):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    tokens = torch.zeros(n, CONTEXT, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:4] = torch.randint(1, 49406, (n, 3), generator=generator)
    tokens[:, 4] = 49407
    return images, tokens


def test_default_logit_scale_is_log_inverse_temperature():
    model = make_model()
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert model.logit_scale.dim() == 0
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert make_model(init_logit_scale=1.5).logit_scale.item() == pytest.approx(1.5)


def test_encoders_normalise_on_request_as_open_clip_does():
    model = make_model().eval()
    images, tokens = batch()
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        raw_image, raw_text = model.vision(images), model.text(tokens)
        # open_clip's default: the projected embeddings as they are.
        torch.testing.assert_close(model.encode_image(images), raw_image)
        torch.testing.assert_close(model.encode_text(tokens), raw_text)
    assert image_features.shape == text_features.shape == (3, EMBED)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    # The towers' raw outputs are not unit norm: the model normalises them.
    assert not torch.allclose(raw_image.norm(dim=-1), torch.ones(3), atol=1e-3)
    assert not torch.allclose(raw_text.norm(dim=-1), torch.ones(3), atol=1e-3)
    torch.testing.assert_close(image_features, raw_image / raw_image.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(text_features, raw_text / raw_text.norm(dim=-1, keepdim=True))


def test_encode_image_passes_keep_to_the_tower():
    model = make_model().eval()
    images, _ = batch(2)
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    with torch.no_grad():
        masked = model.encode_image(images, keep)
        torch.testing.assert_close(masked, model.vision(images, keep))
        assert not torch.allclose(masked, model.encode_image(images), atol=1e-4)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(10.0, math.log(100.0)), (math.log(100.0) + 1e-3, math.log(100.0)), (-0.5, 0.0), (2.0, 2.0), (0.0, 0.0)],
)
def test_clamp_logit_scale(value, expected):
    model = make_model()
    with torch.no_grad():
        model.logit_scale.fill_(value)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(expected, abs=1e-6)
    assert model.logit_scale.requires_grad
    assert model.logit_scale.exp().item() <= 100.0 + 1e-4


def test_clamp_after_optimizer_step_keeps_the_same_parameter():
    """Clamping in place keeps the optimizer's reference; gradient still flows to logit_scale."""
    model = make_model()
    optimizer = torch.optim.SGD([model.logit_scale], lr=1000.0)
    images, tokens = batch()
    image_features, text_features = (
        model.encode_image(images, normalize=True),
        model.encode_text(tokens, normalize=True),
    )
    loss = ClipLoss()(image_features, text_features, model.logit_scale)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    param = model.logit_scale
    optimizer.step()
    model.clamp_logit_scale()
    assert model.logit_scale is param
    assert 0.0 <= model.logit_scale.item() <= math.log(100.0) + 1e-6
    assert model.logit_scale.item() in (pytest.approx(0.0), pytest.approx(math.log(100.0)))
