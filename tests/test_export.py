"""Weights out: a trained checkpoint exported to open_clip computes the same embeddings, and `aclip.load`
serves a checkpoint and an export alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

import aclip
from aclip import export
from aclip.modules.vision import ConvStem
from aclip.open_clip_format import CONFIG_FILE
from aclip.tasks import train
from aclip.trained import load_checkpoint

# open_clip's ViT embeds patches with one linear projection: the towers these tests export have it (the
# tiny default's convolutional stem is refused, tested below).
PATCH_STEM = "model.vision.stem=patch"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for two steps, with its checkpoint (the patch-embedding bias is not zero)."""
    from tests.helpers import TINY_SYNTHETIC_OVERRIDES, compose_config

    root = tmp_path_factory.mktemp("export")
    overrides = [*TINY_SYNTHETIC_OVERRIDES, PATCH_STEM, "trainer.max_steps=2", "evaluation.at_end=false"]
    cfg = compose_config("train", overrides, root / "run")
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt"


def images_and_texts(size: int):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=generator)
    return pixels, ["a red circle", "a blue square among clutter", "two green stars"]


def test_the_export_loads_in_open_clip_and_computes_the_same_embeddings(trained, tmp_path):
    assert export.main([str(trained), str(tmp_path / "out")]) == 0
    ours, _, tokenizer = aclip.load(trained)
    theirs, _, their_preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    theirs.eval()
    pixels, texts = images_and_texts(ours.vision.image_size)
    mean, std = their_preprocess.transforms[-1].mean, their_preprocess.transforms[-1].std
    normalised = (pixels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    tokens = tokenizer(texts)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.encode_image(normalised), ours.encode_image(pixels), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(theirs.encode_text(tokens), ours.encode_text(tokens), atol=1e-5, rtol=1e-4)
    assert theirs.logit_scale.item() == pytest.approx(ours.logit_scale.item())
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert config["preprocess_cfg"]["size"] == ours.vision.image_size  # the model's size, not 224


def test_load_gives_a_run_and_its_export_one_contract(trained, tmp_path):
    """The same user code gets the same features from a run (`ClipModel`) and from its export (open_clip's
    `CLIP`): open_clip's `encode_image(image, normalize=False)`, `encode_text(text, normalize=False)`."""
    export.main([str(trained), str(tmp_path / "out"), "--model", "online"])
    size = aclip.load(trained)[0].vision.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    features = {}
    for source, path in (("export", tmp_path / "out"), ("run", trained)):
        model, preprocess, tokenizer = aclip.load(path, model="online")
        pixels, tokens = preprocess(image)[None], tokenizer(["a red circle", "a blue square"])
        with torch.no_grad():
            features[source] = {
                normalize: (
                    model.encode_image(pixels, normalize=normalize),
                    model.encode_text(tokens, normalize=normalize),
                )
                for normalize in (False, True)
            }
            torch.testing.assert_close(model.encode_image(pixels), features[source][False][0])  # the default
    for normalize in (False, True):
        for theirs, ours in zip(features["export"][normalize], features["run"][normalize], strict=True):
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
            assert torch.allclose(ours.norm(dim=-1), torch.ones(len(ours)), atol=1e-5) == normalize
    with pytest.raises(ValueError, match='model must be "ema" or "online"'):
        aclip.load(trained, model="teacher")


def test_a_quick_gelu_text_tower_is_refused_with_the_reason(train_config):
    module = instantiate(train_config("model.text.activation=quick_gelu", PATCH_STEM).model)
    with pytest.raises(ValueError, match="QuickGELU and its image tower GELU"):
        export.open_clip_config(module.model)


def test_a_convolutional_stem_is_refused_by_the_export_and_by_weights_without_one(
    trained, tmp_path, train_config
):
    conv = train_config("model.vision.stem=conv")
    with pytest.raises(ValueError, match=r"convolutional stem .* cannot express it"):
        export.open_clip_config(instantiate(conv.model).model)
    export.main([str(trained), str(tmp_path / "out")])
    for key, source in (
        ("model.init_from", tmp_path / "out"),
        ("model.vision.init_from", tmp_path / "vit.pt"),
    ):
        if key == "model.vision.init_from":  # a timm ViT's state dict, with its linear patch embedding
            torch.save(instantiate(train_config(PATCH_STEM).model).model.vision.trunk.state_dict(), source)
        with pytest.raises(InstantiationException, match=r"linear (patch embedding|projection)") as error:
            instantiate(train_config("model.vision.stem=conv", f"{key}={source}").model)
        assert "model.vision.stem=patch" in str(error.value)


def test_a_convolutional_stem_run_is_served_from_its_checkpoint_batch_statistics_included(
    tmp_path, train_config
):
    train(train_config("model.vision.stem=conv", "trainer.max_steps=2", "evaluation.at_end=false"))
    loaded, _, _ = aclip.load(tmp_path / "run")
    stem = loaded.vision.trunk.patch_embed.proj
    assert isinstance(stem, ConvStem)  # rebuilt from the description
    # The teacher's running statistics, copied from the student at each step, are saved and restored.
    assert stem[1].num_batches_tracked.item() == 2 and stem[1].running_mean.abs().sum() > 0
    module = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    pixels, _ = images_and_texts(loaded.vision.image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), module.ema_model.encode_image(pixels))


def test_the_readme_lines_run_as_written(trained, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using a trained model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    Image.new("RGB", (120, 90), (30, 120, 200)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace("logs/train/runs/<timestamp>", str(trained.parents[1])), scope)
    assert scope["image_features"].shape == (1, scope["model"].embed_dim)
    assert scope["text_features"].shape == (2, scope["model"].embed_dim)
    torch.testing.assert_close(scope["image_features"].norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(scope["text_features"].norm(dim=-1), torch.ones(2))


def test_init_from_an_export_or_a_checkpoint_starts_from_its_weights(trained, tmp_path, train_config):
    export.main([str(trained), str(tmp_path / "out")])
    reference, _, tokenizer = aclip.load(trained)  # the EMA model the export holds
    tokens = tokenizer(["a red circle"])
    pixels, _ = images_and_texts(reference.vision.image_size)
    for source in (tmp_path / "out", trained):
        module = instantiate(train_config(f"model.init_from={source}", PATCH_STEM).model)
        with torch.no_grad():
            for model in (module.model, module.ema_model):  # the teacher starts as the initialised student
                torch.testing.assert_close(
                    model.encode_image(pixels), reference.encode_image(pixels), atol=1e-5, rtol=1e-4
                )
                torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens))
        assert "init_from" not in module.hparams  # a checkpoint of the new run holds its own weights
    cfg = train_config(
        f"model.init_from={tmp_path / 'out'}", PATCH_STEM, "debug=fast_dev_run", "evaluation.at_end=false"
    )
    train(cfg)  # and it trains


def test_init_from_weights_of_other_widths_lists_what_does_not_fit(trained, train_config):
    with pytest.raises(
        InstantiationException, match=r"does not fit this model \(.*other shapes: vision\.proj\.weight"
    ):
        instantiate(train_config(f"model.init_from={trained}", PATCH_STEM, "model.vision.width=32").model)


def test_init_from_a_run_of_another_grid_and_context_resizes_both_towers_positions(trained, train_config):
    """CLIPA's fine-tuning stage: the weights of a 32 px, 16-token run start a 48 px, 24-token model."""
    from open_clip.model import resize_text_pos_embed
    from timm.layers import resample_abs_pos_embed

    source, _, _ = aclip.load(trained)
    module = instantiate(
        train_config(
            f"model.init_from={trained}",
            PATCH_STEM,
            "model.vision.image_size=48",
            "model.text.context_length=24",
        ).model
    )
    vision, text = module.model.vision, module.model.text.transformer
    torch.testing.assert_close(
        vision.trunk.pos_embed,
        resample_abs_pos_embed(source.vision.trunk.pos_embed, [6, 6], num_prefix_tokens=1),
    )
    expected = {"positional_embedding": source.text.transformer.positional_embedding}
    resize_text_pos_embed(expected, text)
    assert text.positional_embedding.shape[0] == 24
    torch.testing.assert_close(text.positional_embedding, expected["positional_embedding"])
    for name, value in source.state_dict().items():
        if "pos" not in name:
            torch.testing.assert_close(module.model.state_dict()[name], value, msg=name)
    torch.testing.assert_close(
        module.ema_model.text.transformer.positional_embedding, text.positional_embedding
    )


def _open_clip_model(context_length: int) -> open_clip.CLIP:
    """An open_clip CLIP whose text tower has the tiny test model's sizes."""
    torch.manual_seed(context_length)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1},
        text_cfg={"context_length": context_length, "width": 64, "heads": 2, "layers": 2},
    )


def test_an_open_clip_text_tower_loads_and_computes_the_same_embeddings(tmp_path, train_config):
    theirs = _open_clip_model(context_length=16).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "oc.pt")
    module = instantiate(train_config(f"model.text.init_from={tmp_path / 'oc.pt'}").model)
    tokens = module.tokenizer(["a red circle", "two green stars among clutter"])
    with torch.no_grad():
        torch.testing.assert_close(module.model.encode_text(tokens), theirs.encode_text(tokens))
        torch.testing.assert_close(module.ema_model.encode_text(tokens), theirs.encode_text(tokens))
    assert "init_from" not in module.hparams.text

    shorter = _open_clip_model(context_length=8)  # CLIPA's T8: interpolated to the tower's 16 positions
    save_file_of(shorter.state_dict(), tmp_path / "oc8.safetensors")
    module = instantiate(train_config(f"model.text.init_from={tmp_path / 'oc8.safetensors'}").model)
    text = module.model.text.transformer
    torch.testing.assert_close(
        text.transformer.resblocks[1].mlp.c_fc.weight, shorter.transformer.resblocks[1].mlp.c_fc.weight
    )
    torch.testing.assert_close(
        text.positional_embedding[0], shorter.positional_embedding[0], atol=0.05, rtol=0
    )
    assert text.positional_embedding.shape[0] == 16

    with pytest.raises(
        InstantiationException, match=r"model\.text\.init_from=.*other shapes: text_projection"
    ):
        instantiate(train_config(f"model.text.init_from={tmp_path / 'oc.pt'}", "model.embed_dim=48").model)


def save_file_of(weights: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: value.contiguous() for name, value in weights.items()}, str(path))


def test_a_timm_vision_state_dict_of_another_grid_loads_with_resized_positions(tmp_path, train_config):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    source = instantiate(train_config(PATCH_STEM).model).model.vision.trunk  # 32 px: a 4 x 4 grid
    weights = {f"trunk.{name}": value.clone() for name, value in source.state_dict().items()}
    weights["trunk.head.weight"] = torch.zeros(10, source.embed_dim)  # a classifier the tower has no use for
    save_file(weights, str(tmp_path / "vit.safetensors"))

    module = instantiate(
        train_config(
            "model.vision.image_size=48", PATCH_STEM, f"model.vision.init_from={tmp_path / 'vit.safetensors'}"
        ).model
    )
    trunk = module.model.vision.trunk  # 48 px: a 6 x 6 grid
    torch.testing.assert_close(trunk.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(
        trunk.pos_embed, resample_abs_pos_embed(source.pos_embed, [6, 6], num_prefix_tokens=1)
    )
    torch.testing.assert_close(module.ema_model.vision.trunk.pos_embed, trunk.pos_embed)  # the teacher too
    assert "init_from" not in module.hparams.vision

    del weights["trunk.blocks.0.attn.qkv.weight"]
    save_file(weights, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InstantiationException, match=r"missing: blocks\.0\.attn\.qkv\.weight"):
        instantiate(
            train_config(f"model.vision.init_from={tmp_path / 'partial.safetensors'}", PATCH_STEM).model
        )
