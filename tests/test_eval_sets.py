"""Evaluation sets on disk (class folders, Karpathy-split captions) and the `eval` config group."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from aclip.datamodules.eval_sets import ImageFolderClassification, KarpathyRetrieval
from aclip.tasks import train
from tests.helpers import CONF_DIR, compose_config

EVAL_DIR = CONF_DIR / "eval"
SUITE = "slip26"


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes, images in greyscale, CMYK, 16-bit greyscale, RGBA and RGB."""
    root = tmp_path / "test"
    save(Image.new("L", (32, 32), 128), root / "zebra" / "grey.png")
    save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), root / "zebra" / "cmyk.jpg")
    save(Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)), root / "apple_pie" / "deep.png")
    save(Image.new("RGBA", (32, 32), (0, 0, 255, 0)), root / "apple_pie" / "clear.png")
    save(Image.new("RGB", (32, 32), (0, 200, 0)), root / "apple_pie" / "green.jpg")
    return root


def test_image_folder_labels_follow_sorted_class_folders(image_folder):
    dataset = ImageFolderClassification(image_folder)
    assert dataset.classes == ["apple_pie", "zebra"]
    labels = {Path(path).name: label for path, label in dataset.samples}
    assert labels == {"clear.png": 0, "deep.png": 0, "green.jpg": 0, "cmyk.jpg": 1, "grey.png": 1}
    assert [label for _, label in dataset] == [labels[Path(path).name] for path, _ in dataset.samples]


def test_image_folder_converts_every_mode_to_rgb(image_folder):
    dataset = ImageFolderClassification(image_folder)
    images = {Path(path).name: dataset[i][0] for i, (path, _) in enumerate(dataset.samples)}
    assert {image.mode for image in images.values()} == {"RGB"}
    assert images["grey.png"].getpixel((0, 0)) == (128, 128, 128)
    assert images["deep.png"].getpixel((0, 0)) == (255, 255, 255)  # 16-bit white, not clipped
    assert images["clear.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent on white
    red, green, blue = images["cmyk.jpg"].getpixel((0, 0))
    assert red > 200 and green < 50 and blue < 50


def test_unreadable_eval_image_is_an_error_naming_the_file(image_folder):
    broken = image_folder / "zebra" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = ImageFolderClassification(image_folder)
    index = [Path(path) for path, _ in dataset.samples].index(broken)
    with pytest.raises(OSError, match=re.escape(str(broken))):
        dataset[index]


@pytest.mark.parametrize("make_root", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_image_folder_without_class_folders_names_the_config_key(tmp_path, make_root):
    with pytest.raises(FileNotFoundError, match=r"evaluation\.sets\.<name>\.dataset\.root"):
        ImageFolderClassification(make_root(tmp_path))


def karpathy_entry(filename: str, split: str, captions: list[str], filepath: str | None = None) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": raw} for raw in captions]}
    return entry if filepath is None else {**entry, "filepath": filepath}


def write_karpathy(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"images": entries}))
    return path


def test_karpathy_flickr_layout_selects_the_split_with_all_captions(tmp_path):
    images = tmp_path / "flickr30k-images"
    for name, colour in (("1.png", (255, 0, 0)), ("2.png", (0, 255, 0)), ("3.png", (0, 0, 255))):
        save(Image.new("RGB", (32, 32), colour), images / name)
    annotations = write_karpathy(
        tmp_path / "dataset.json",
        [
            karpathy_entry("1.png", "test", [" A red square. ", "Red.", "A red image."]),
            karpathy_entry("2.png", "train", ["A green square."]),
            karpathy_entry("3.png", "test", ["A blue square.", "Blue."]),
        ],
    )
    dataset = KarpathyRetrieval(annotations, images, split="test")
    assert len(dataset) == 2
    assert dataset.captions == [["A red square.", "Red.", "A red image."], ["A blue square.", "Blue."]]
    assert [image.getpixel((0, 0)) for image in dataset] == [(255, 0, 0), (0, 0, 255)]
    assert KarpathyRetrieval(annotations, images, split="train").captions == [["A green square."]]


def test_karpathy_coco_layout_reads_images_under_filepath(tmp_path):
    save(Image.new("L", (32, 32), 7), tmp_path / "coco" / "val2014" / "COCO_val2014_1.jpg")
    annotations = write_karpathy(
        tmp_path / "dataset.json",
        [
            karpathy_entry("COCO_val2014_1.jpg", "restval", ["one", "two"], filepath="val2014"),
            karpathy_entry("COCO_val2014_2.jpg", "test", ["three"], filepath="val2014"),
        ],
    )
    dataset = KarpathyRetrieval(annotations, tmp_path / "coco", split="restval")
    assert dataset.captions == [["one", "two"]]
    assert dataset[0].mode == "RGB"


def test_karpathy_rejects_bad_splits_and_captions(tmp_path):
    annotations = write_karpathy(tmp_path / "dataset.json", [karpathy_entry("1.jpg", "test", ["a caption"])])
    with pytest.raises(ValueError, match="split must be one of"):
        KarpathyRetrieval(annotations, tmp_path, split="testing")
    with pytest.raises(ValueError, match="no image in split 'val'"):
        KarpathyRetrieval(annotations, tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match=r"evaluation\.sets\.<name>\.dataset\.annotations"):
        KarpathyRetrieval(tmp_path / "missing.json", tmp_path)
    empty = write_karpathy(tmp_path / "dataset.json", [karpathy_entry("1.jpg", "test", ["a caption", "  "])])
    with pytest.raises(ValueError, match=r"1\.jpg has a missing or empty caption"):
        KarpathyRetrieval(empty, tmp_path)


# --- The `eval` config group: one option per set, and the suite that pulls in the SLIP/A-CLIP 26.

SET_OPTIONS = sorted(p.stem for p in EVAL_DIR.glob("*.yaml") if p.stem != SUITE)
# synthetic.yaml, glyphs.yaml and segments.yaml hold two sets of the built-in data each; every other option
# is one set.
BUILT_IN = ("synthetic", "glyphs", "segments")
SINGLE_SET_OPTIONS = [option for option in SET_OPTIONS if option not in BUILT_IN]


def load_option(option: str) -> DictConfig:
    return OmegaConf.load(EVAL_DIR / f"{option}.yaml")


def suite_members() -> list[str]:
    return list(load_option(SUITE).defaults)


def targets(node: object) -> list[str]:
    """Every `_target_` in a config tree (plain containers: interpolations are left unresolved)."""
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [target for value in node.values() for target in targets(value)]
    return []


@pytest.mark.parametrize("option", SINGLE_SET_OPTIONS)
def test_each_option_defines_one_set_named_after_its_file(option):
    assert list(load_option(option)) == [option]


@pytest.mark.parametrize("option", SET_OPTIONS)
def test_option_targets_resolve_to_classes(option):
    found = targets(OmegaConf.to_container(load_option(option)))
    assert found
    for target in found:
        assert isinstance(get_class(target), type)


@pytest.mark.parametrize("option", [*SET_OPTIONS, SUITE])
def test_option_composes_and_resolves(tmp_path, option):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt", f"eval=[{option}]"], tmp_path)
    sets = OmegaConf.to_container(cfg.evaluation.sets, resolve=True)
    assert set(sets) == set(suite_members() if option == SUITE else load_option(option))


def test_suite_is_every_zero_shot_set_but_the_built_in_ones(tmp_path):
    zero_shot = {
        option
        for option in SINGLE_SET_OPTIONS
        if load_option(option)[option]["_target_"] == "aclip.evaluation.ZeroShotClassification"
    }
    assert len(suite_members()) == 26
    assert set(suite_members()) == zero_shot
    cfg = compose_config("eval", ["ckpt_path=x.ckpt", f"eval=[{SUITE},flickr30k,coco]"], tmp_path)
    assert set(cfg.evaluation.sets) == zero_shot | {"flickr30k", "coco"}


def test_sets_instantiate_from_files_under_the_data_dir(tmp_path):
    memes = tmp_path / "eval" / "hateful_memes"
    for label in ("0", "1"):
        save(Image.new("RGB", (32, 32)), memes / "test" / label / "meme.png")
    (memes / "classnames.txt").write_text("a meme.\na hateful meme.\n")
    (memes / "templates.txt").write_text("{}\n")
    flickr = tmp_path / "eval" / "flickr30k"
    save(Image.new("RGB", (32, 32)), flickr / "flickr30k-images" / "1.png")
    write_karpathy(
        flickr / "dataset_flickr30k.json", [karpathy_entry("1.png", "test", ["a caption", "another"])]
    )
    overrides = ["ckpt_path=x.ckpt", "eval=[hateful_memes,flickr30k]", f"paths.data_dir={tmp_path}"]
    sets = instantiate(compose_config("eval", overrides, tmp_path / "run").evaluation.sets)
    assert sets.hateful_memes.classnames == ["a meme.", "a hateful meme."]
    assert sets.hateful_memes.templates == ["{}"]
    assert len(sets.hateful_memes.dataset) == 2
    assert sets.flickr30k.dataset.captions == [["a caption", "another"]]


def test_clip_benchmark_keys_in_configs_exist():
    package = pytest.importorskip("clip_benchmark.datasets")
    files = {"classnames": "en_classnames.json", "templates": "en_zeroshot_classification_templates.json"}
    tables = {
        field: json.loads(resources.files(package).joinpath(file).read_text())
        for field, file in files.items()
    }
    for option in SINGLE_SET_OPTIONS:
        node = OmegaConf.to_container(load_option(option)[option])
        for field, table in tables.items():
            spec = node.get(field)
            if isinstance(spec, str) and spec.startswith("clip_benchmark:"):
                assert spec.removeprefix("clip_benchmark:") in table, f"{option}.{field}: {spec}"


def test_the_documented_set_of_ones_own_reports_during_and_after_training(train_config, image_folder):
    """docs/evaluation.md's file for a folder of class folders, as written there (its root moved to the
    test's folder): the run reports the set on its learning curve and at the end."""
    docs = (CONF_DIR.parent / "docs" / "evaluation.md").read_text()
    block = re.search(r"### A set of your own\n.*?```yaml\n(.*?)```", docs, re.DOTALL)
    own = OmegaConf.create(block.group(1))
    own.digits.dataset.root = str(image_folder)
    cfg = train_config("trainer.max_steps=2", "evaluation.every_n_steps=1")
    cfg.evaluation.sets = own
    metrics = train(cfg)
    assert set(metrics["ema"]) >= {"zeroshot/digits/top1", "zeroshot/digits/mean_per_class_recall"}
    assert "val/zeroshot/digits/top1" in (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
