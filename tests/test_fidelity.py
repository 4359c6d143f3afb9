"""The paper presets follow A-CLIP's published recipe (docs/fidelity.md); each switch does what it says."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from open_clip.transformer import QuickGELU
from PIL import Image
from torch import nn

from aclip.datamodules.transforms import MultiViewTransform, PhotometricAugment
from aclip.evaluation import EvalLoaders, Evaluation, ZeroShotClassification
from aclip.modules.losses import SimCLRReferenceLoss
from aclip.modules.self_supervision import SelfSupervision
from tests.helpers import A_CLIP_OPTIMIZER, compose_config
from tests.test_evaluation import COLOURS, ColourModel, SolidColours, colour_tokenize

# A tiny tower under the paper recipe: the recipe's switches, not its size, are what is checked.
TINY_TOWERS = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.depth=2",
    "model.vision.heads=2",
    "model.text.context_length=16",
    "model.text.width=32",
    "model.text.heads=2",
    "model.text.layers=2",
    "model.embed_dim=32",
    "model.self_supervision.hidden_dim=64",
    "model.self_supervision.out_dim=16",
]


@pytest.mark.parametrize("method", ["aclip", "aclip_eff"])
def test_paper_presets_pin_the_published_recipe(tmp_path, method):
    cfg = compose_config("train", ["experiment=paper", f"method={method}"], tmp_path)
    masking, ssl, data = cfg.masking, cfg.model.self_supervision, cfg.data
    # Masking: attentive, 2 views of 50 %, decided on 2 x 2-patch (32 px) cells, all layers' CLS attention.
    assert masking._target_.endswith("AttentiveLow")
    assert (masking.keep_ratio, masking.unit, masking.layers) == (0.5, 2, "all")
    assert data.num_views == 2
    # Heads: SimCLR + 2 x BYOL on the CLS token before the projection; batch norm, ReLU, the biases.
    assert (ssl.view_loss, ssl.view_weight, ssl.byol_weight, ssl.temperature) == ("simclr", 1.0, 2.0, 0.1)
    assert (ssl.source, ssl.norm, ssl.activation) == ("cls_token", "batch", "relu")
    assert (ssl.view_head_bias, ssl.byol_head_bias, ssl.hidden_dim, ssl.out_dim) == (True, False, 4096, 256)
    assert cfg.trainer.sync_batchnorm  # SyncBatchNorm under DDP
    # Towers: ViT-B/16 with frozen patch embedding, ImageNet statistics; CLIP's text tower with QuickGELU.
    vision, text = cfg.model.vision, cfg.model.text
    assert (vision.image_size, vision.patch_size, vision.width, vision.depth) == (224, 16, 768, 12)
    assert (vision.normalize, vision.freeze_patch_embed) == ("imagenet", True)
    assert (text.width, text.layers, text.heads, text.context_length, text.activation) == (
        512, 12, 8, 77, "quick_gelu"
    )  # fmt: skip
    # Views: crops of scale (0.5, 1), bilinear, the published photometric augmentation.
    assert list(data.crop_scale) == [0.5, 1.0] and data.interpolation == "bilinear"
    augment = data.augment
    assert list(augment.color_jitter) == [0.4, 0.4, 0.2, 0.1] and list(augment.blur_sigma) == [0.1, 2.0]
    assert (augment.color_jitter_p, augment.grayscale_p, augment.blur_p, augment.solarize_p) == (
        0.8,
        0.2,
        0.1,
        0.2,
    )
    assert data.ema_image_size == (112 if method == "aclip_eff" else 224)
    # Recipe: AdamW, schedule, batch, epochs, EMA.
    model = cfg.model
    assert OmegaConf.to_container(model.optimizer) == A_CLIP_OPTIMIZER
    assert (model.scheduler.warmup_epochs, model.scheduler.warmup_start_lr, model.scheduler.min_lr) == (
        1.0,
        1e-6,
        1e-5,
    )
    # The published method: the teacher decides from the first step.
    assert (model.teacher_warmup_steps, model.teacher_warmup_until_loss) == (0, None)
    assert (data.batch_size, cfg.trainer.max_epochs, cfg.callbacks.ema.base_momentum) == (4096, 25, 0.996)
    # Evaluation: SLIP's 7 ImageNet templates, bilinear resize.
    assert (
        cfg.evaluation.sets.imagenet.templates == "simple"
        and cfg.evaluation.loader.interpolation == "bilinear"
    )
    assert cfg.evaluation.sets.imagenet.get("reported_metric", "top1") == "top1"


def test_paper_module_freezes_the_patch_embedding_and_uses_quick_gelu(train_config):
    module = instantiate(train_config("experiment=paper", "method=aclip", *TINY_TOWERS).model)
    patch = module.model.vision.trunk.patch_embed.proj
    assert not any(p.requires_grad for p in patch.parameters())
    assert all(p.requires_grad for p in module.model.vision.trunk.blocks.parameters())
    assert isinstance(module.model.text.transformer.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert module.model.vision.normalize == "imagenet"
    heads = module.self_supervision
    assert heads.view_projector.in_dim == module.model.vision.width  # the CLS token, not the embedding
    linears = [m for m in heads.byol_projector.modules() if isinstance(m, nn.Linear)]
    assert all(m.bias is None for m in linears)
    assert all(m.bias is not None for m in heads.view_projector.modules() if isinstance(m, nn.Linear))
    assert any(isinstance(m, nn.BatchNorm1d) for m in heads.byol_projector.modules())


class GradientProbe(pl.Callback):
    """After the first backward pass: which parameters the loss reached."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor | None] = {}

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self.grads:
            for name, param in pl_module.model.vision.named_parameters():
                self.grads[name] = None if param.grad is None else param.grad.detach().clone()


@pytest.mark.parametrize("source", ["cls_token", "embedding"])
def test_self_supervised_gradients_reach_the_trunk_not_the_image_projection(
    train_config, monkeypatch, source
):
    """With the CLIP loss silenced, A-CLIP's wiring (source=cls_token) trains the trunk through SimCLR and
    BYOL but leaves the CLIP image projection alone; reading the embedding trains the projection too."""
    from aclip.modules.losses import ClipLoss

    monkeypatch.setattr(ClipLoss, "forward", lambda self, image, text, scale: (image.sum() + text.sum()) * 0)
    cfg = train_config(
        "method=aclip",
        f"model.self_supervision.source={source}",
        "model.auxiliary_after_warmup=false",  # the published method: every term from the first step
        "evaluation.at_end=false",
    )
    module = instantiate(cfg.model)
    probe = GradientProbe()
    callbacks = [instantiate(cfg.callbacks.ema), probe]
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, max_steps=1)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    projection = probe.grads["proj.weight"]
    trunk = probe.grads["trunk.blocks.0.attn.qkv.weight"]
    assert trunk is not None and trunk.abs().sum() > 0
    if source == "cls_token":
        assert projection is None or projection.abs().sum() == 0
    else:
        assert projection is not None and projection.abs().sum() > 0


def test_ema_byol_projector_normalises_with_its_own_batch_statistics():
    """A-CLIP's EMA projector is in train mode: its batch norm centres the teacher's batch, whatever the
    running statistics copied from the online projector say."""
    torch.manual_seed(0)
    heads = SelfSupervision(
        embed_dim=8, cls_dim=8, byol_weight=1.0, source="cls_token", norm="batch", hidden_dim=16, out_dim=4
    ).train()
    norm = next(m for m in heads.ema_projector.modules() if isinstance(m, nn.BatchNorm1d))
    seen = {}
    norm.register_forward_hook(lambda module, args, output: seen.update(output=output))
    ema_features = torch.randn(32, 8) * 3 + 5  # far from the running statistics (mean 0, variance 1)
    heads(torch.randn(32, 2, 8), ema_features)
    torch.testing.assert_close(seen["output"].mean(dim=0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["output"].var(dim=0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)


def test_simclr_reference_is_the_published_term_on_a_hand_made_example():
    """views[:, 0] of three images at unit vectors; the published loss compares each with itself:
    mean_b -s_bb + log(sum_c exp(s_bc) + sum_{c != b} exp(s_bc)), s = cosine / temperature."""
    first = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    views = torch.stack([first, torch.randn(3, 2)], dim=1)  # the second view plays no part
    temperature = 0.5
    z = F.normalize(first, dim=-1)
    s = (z @ z.T / temperature).tolist()
    expected = 0.0
    for b in range(3):
        total = sum(math.exp(v) for v in s[b]) + sum(math.exp(v) for c, v in enumerate(s[b]) if c != b)
        expected += -s[b][b] + math.log(total)
    loss = SimCLRReferenceLoss(temperature)(views)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-6)
    views[:, 1] = torch.randn(3, 2)
    assert SimCLRReferenceLoss(temperature)(views).item() == pytest.approx(expected / 3, rel=1e-6)


def test_simclr_reference_trains_through_train_py_presets(train_config):
    cfg = train_config(
        "method=aclip", "model.self_supervision.view_loss=simclr_reference", "debug=fast_dev_run"
    )
    assert isinstance(instantiate(cfg.model).self_supervision.view_loss, SimCLRReferenceLoss)


def test_photometric_augmentation_of_the_published_kinds():
    image = Image.new("RGB", (16, 16), (200, 40, 10))
    grey = PhotometricAugment(grayscale_p=1.0)(image).convert("RGB").getpixel((3, 3))
    assert grey[0] == grey[1] == grey[2]
    solarised = PhotometricAugment(solarize_p=1.0)(image).getpixel((3, 3))
    assert solarised == (255 - 200, 40, 10)  # pixels at or above 128 inverted
    torch.manual_seed(0)
    views = MultiViewTransform(16, num_views=2, augment={"grayscale_p": 1.0})(image)
    assert torch.equal(views["images"][0][0], views["images"][0][1])  # every view greyed ...
    assert not torch.equal(views["ema_image"][0], views["ema_image"][1])  # ... not the teacher's crop


def test_reported_figures_follow_the_papers_protocol():
    """Mean per-class recall and ROC-AUC as each set's `reported`, and the suite's average."""
    images = SolidColours(["red", "red", "green", "green", "blue", "red"], labels=[0, 0, 0, 1, 2, 2])
    recall = ZeroShotClassification(
        images, list(COLOURS), ["{}"], name="a", reported_metric="mean_per_class_recall"
    )
    top1 = ZeroShotClassification(images, list(COLOURS), ["{}"], name="b")
    # Two classes, scored by logit(green) - logit(red); the images' colours are mixtures.
    mixtures = {"p0": (200, 60, 0), "p1": (150, 120, 0), "p2": (60, 200, 0), "p3": (120, 150, 0)}
    COLOURS.update(mixtures)
    try:
        binary = SolidColours(list(mixtures), labels=[0, 1, 1, 0])
        auc = ZeroShotClassification(binary, ["red", "green"], ["{}"], name="c", reported_metric="roc_auc")
        loaders = EvalLoaders(image_size=8, batch_size=2, num_workers=0)
        metrics = Evaluation([recall, top1, auc], loaders).run({"m": ColourModel()}, colour_tokenize)["m"]
    finally:
        for name in mixtures:
            COLOURS.pop(name)
    assert metrics["zeroshot/a/reported"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert metrics["zeroshot/b/reported"] == metrics["zeroshot/b/top1"] == pytest.approx(100 * 4 / 6)
    # Scores rank p2 > p3 > p1 > p0 (greener first); positives are p1 and p2: 3 of the 4 pairs in order.
    assert metrics["zeroshot/c/reported"] == metrics["zeroshot/c/roc_auc"] == pytest.approx(75.0)
    expected = (metrics["zeroshot/a/reported"] + metrics["zeroshot/b/reported"] + 75.0) / 3
    assert metrics["zeroshot/average/reported"] == pytest.approx(expected)


def test_top1_top5_mean_is_the_kinetics_figure():
    """Six colour classes; each image's label ranks 1st (red), 2nd or 3rd (yellow, cyan) or 6th (magenta):
    top-1 25 %, top-5 75 %, reported (25 + 75) / 2."""
    extra = {"yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255)}
    COLOURS.update(extra)
    try:
        names = ["red", "green", "blue", *extra]
        dataset = SolidColours(["red", "yellow", "cyan", "magenta"], labels=[0, 0, 2, 1])
        task = ZeroShotClassification(dataset, names, ["{}"], name="k", reported_metric="top1_top5_mean")
        loaders = EvalLoaders(image_size=8, batch_size=2, num_workers=0)
        metrics = Evaluation([task], loaders).run({"m": ColourModel()}, colour_tokenize)["m"]
    finally:
        for name in extra:
            COLOURS.pop(name)
    assert (metrics["zeroshot/k/top1"], metrics["zeroshot/k/top5"]) == (25.0, 75.0)
    assert metrics["zeroshot/k/reported"] == metrics["zeroshot/k/top1_top5_mean"] == 50.0
    with pytest.raises(ValueError, match="roc_auc needs two classes"):
        ZeroShotClassification(dataset, names, ["{}"], name="k", reported_metric="roc_auc")
