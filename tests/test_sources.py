"""The file-based training sources: CSV/TSV tables, YFCC-15M zip shards (SLIP's layout) and COCO Captions."""

from __future__ import annotations

import csv
import io
import json
import pickle
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from aclip.datamodules import yfcc15m
from aclip.datamodules.coco import CocoCaptions
from aclip.datamodules.csv_source import CsvCaptions
from aclip.datamodules.yfcc15m import Yfcc15mCaptions, shard_member
from aclip.tasks import train
from tests.helpers import TINY_OVERRIDES, compose_config


def colour(index: int) -> tuple[int, int, int]:
    """A colour per sample, so that a test can tell which image it got."""
    return (index * 9 % 256, 255 - index * 5 % 256, 60 + index * 3 % 128)


def image_bytes(index: int, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour(index)).save(buffer, image_format)
    return buffer.getvalue()


def assert_shows(image: Image.Image, index: int, tolerance: int = 0) -> None:
    """`image` is the 40x40 RGB image of sample `index` (JPEG: within `tolerance` per channel)."""
    assert image.mode == "RGB" and image.size == (40, 40)
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(colour(index), dtype=np.int16))
    assert difference.max() <= tolerance


def write_csv(
    path: Path,
    rows: Sequence[tuple[str, str]],
    columns: tuple[str, str] = ("filepath", "title"),
    separator: str = ",",
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter=separator)
        writer.writerow([*columns, "url"])
        writer.writerows((image, caption, "http://example.com") for image, caption in rows)
    return path


def csv_dataset(folder: Path, size: int = 16, bad: Sequence[int] = ()) -> Path:
    """`folder/train.csv` listing `size` PNGs in `folder/images`; the images of rows `bad` are missing."""
    (folder / "images").mkdir(parents=True)
    for index in range(size):
        if index not in bad:
            (folder / "images" / f"{index:03d}.png").write_bytes(image_bytes(index))
    rows = [(f"images/{index:03d}.png", f"caption {index}") for index in range(size)]
    return write_csv(folder / "train.csv", rows)


def yfcc_dataset(folder: Path, samples: Sequence[tuple[int, str, str]]) -> Path:
    """SLIP's layout in `folder`: `yfcc15m.pkl` and the JPEG of each sample's index under `images/`."""
    for image_index, _, _ in samples:
        shard, member = shard_member(image_index)
        (folder / "images" / shard).parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(folder / "images" / shard, "a") as archive:
            archive.writestr(member, image_bytes(image_index % 1000, "JPEG"))
    path = folder / "yfcc15m.pkl"
    path.write_bytes(pickle.dumps(list(samples)))
    return path


def coco_dataset(folder: Path, captions: dict[int, list[str]], images: Sequence[int]) -> Path:
    """`folder/annotations/captions.json` for `images` (ids), with PNGs in `folder/train2017`."""
    (folder / "train2017").mkdir(parents=True)
    for image_id in images:
        (folder / "train2017" / f"{image_id:012d}.png").write_bytes(image_bytes(image_id))
    pairs = [(image_id, caption) for image_id, texts in captions.items() for caption in texts]
    annotations = [{"id": n, "image_id": i, "caption": caption} for n, (i, caption) in enumerate(pairs)]
    content = {
        "info": {},
        "images": [{"id": i, "file_name": f"{i:012d}.png", "height": 40, "width": 40} for i in images],
        "annotations": annotations,
    }
    path = folder / "annotations" / "captions.json"
    path.parent.mkdir()
    path.write_text(json.dumps(content))
    return path


def run_config(run_dir: Path, *overrides: str) -> DictConfig:
    """The tiny training config of conftest for a file-based source (`data=<name>` among `overrides`)."""
    return compose_config("train", [*TINY_OVERRIDES, "evaluation.at_end=false", *overrides], run_dir)


def draws(dataset: Dataset, index: int, n: int = 64) -> set[str]:
    """The distinct captions of `n` accesses to `dataset[index]`."""
    random.seed(0)
    return {dataset[index][1] for _ in range(n)}


# CSV / TSV


def test_csv_reads_relative_and_absolute_paths(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "a.png").write_bytes(image_bytes(1))
    elsewhere = tmp_path / "elsewhere" / "b.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(image_bytes(2))
    rows = [("sub/a.png", "  a caption, with a comma "), (str(elsewhere), "another caption")]
    path = write_csv(tmp_path / "meta" / "train.csv", rows)
    dataset = CsvCaptions(path, root=tmp_path / "images")
    assert len(dataset) == 2
    (first, first_caption), (second, second_caption) = dataset[0], dataset[1]
    assert first_caption == "a caption, with a comma"
    assert_shows(first, 1)
    assert second_caption == "another caption"
    assert_shows(second, 2)


def test_csv_root_defaults_to_the_files_folder(tmp_path):
    dataset = CsvCaptions(csv_dataset(tmp_path, size=3))
    assert [dataset[i][1] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]
    assert_shows(dataset[2][0], 2)


@pytest.mark.parametrize(
    ("name", "written", "configured"),
    [("train.tsv", "\t", None), ("train.txt", "\t", "\t"), ("train.csv", ";", ";"), ("train.CSV", ",", None)],
)
def test_csv_separators(tmp_path, name, written, configured):
    (tmp_path / "x.png").write_bytes(image_bytes(3))
    path = write_csv(tmp_path / name, [("x.png", "tabs, commas; and semicolons")], ("img", "text"), written)
    dataset = CsvCaptions(path, image_column="img", caption_column="text", separator=configured)
    image, caption = dataset[0]
    assert caption == "tabs, commas; and semicolons"
    assert_shows(image, 3)


def test_csv_errors_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.csv does not exist; set data\.train\.path"):
        CsvCaptions(tmp_path / "missing.csv")
    path = write_csv(tmp_path / "train.csv", [("a.png", "a")], columns=("image", "caption"))
    with pytest.raises(ValueError, match=r"has \['image', 'caption', 'url'\].*data\.train\.image_column"):
        CsvCaptions(path)
    with pytest.raises(FileNotFoundError, match=r"data\.train\.root"):
        CsvCaptions(path, root=tmp_path / "no_images", image_column="image", caption_column="caption")
    empty = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match="no rows"):
        CsvCaptions(empty)


# YFCC-15M


def test_yfcc_shard_layout_is_slips():
    assert shard_member(12345678) == ("12/345.zip", "678.jpg")
    assert shard_member(7) == ("00/000.zip", "007.jpg")


def test_yfcc_reads_images_from_zip_shards(tmp_path):
    samples = [(12345678, "first", ""), (12345001, "second", ""), (345, "third", "")]
    yfcc_dataset(tmp_path, samples)
    assert (tmp_path / "images" / "12" / "345.zip").is_file()
    dataset = Yfcc15mCaptions(tmp_path / "yfcc15m.pkl")
    assert len(dataset) == 3
    for position, (image_index, title, _) in enumerate(samples):
        image, caption = dataset[position]
        assert caption == title
        assert_shows(image, image_index % 1000, tolerance=3)


def test_yfcc_root_can_differ_from_the_metadata_folder(tmp_path):
    yfcc_dataset(tmp_path / "data", [(42, "a title", "")])
    metadata = tmp_path / "meta" / "yfcc15m.pkl"
    metadata.parent.mkdir()
    (tmp_path / "data" / "yfcc15m.pkl").rename(metadata)
    assert Yfcc15mCaptions(metadata, root=tmp_path / "data")[0][1] == "a title"


def test_yfcc_caption_is_a_random_non_empty_field(tmp_path):
    samples = [(1, "title only", ""), (2, "   ", "description only"), (3, " a title ", "a description")]
    dataset = Yfcc15mCaptions(yfcc_dataset(tmp_path, samples))
    assert draws(dataset, 0) == {"title only"}
    assert draws(dataset, 1) == {"description only"}
    assert draws(dataset, 2) == {"a title", "a description"}


def test_yfcc_keeps_shards_open_per_process(tmp_path, monkeypatch):
    dataset = Yfcc15mCaptions(yfcc_dataset(tmp_path, [(1, "a", ""), (2, "b", ""), (5001, "c", "")]))
    opened: list[str] = []
    open_zip = zipfile.ZipFile

    def counting_open(path: Path) -> zipfile.ZipFile:
        opened.append(Path(path).name)
        return open_zip(path)

    monkeypatch.setattr(zipfile, "ZipFile", counting_open)
    dataset[0], dataset[1], dataset[0]
    assert opened == ["000.zip"]  # once for both images of the shard
    monkeypatch.setattr(yfcc15m.os, "getpid", lambda: -1)  # as in a forked dataloader worker
    dataset[1]
    assert opened == ["000.zip", "000.zip"]


def test_yfcc_pickles_without_its_open_shards(tmp_path):
    samples = [(1, "a", ""), (5002, "b", "")]
    dataset = Yfcc15mCaptions(yfcc_dataset(tmp_path, samples), max_open_shards=1)
    dataset[0], dataset[1]  # the second shard replaces the first in the cache
    copy = pickle.loads(pickle.dumps(dataset))  # as for a dataloader worker started by spawn
    for position, (image_index, title, _) in enumerate(samples):
        image, caption = copy[position]
        assert caption == title
        assert_shows(image, image_index % 1000, tolerance=3)


def test_yfcc_errors_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.train\.path"):
        Yfcc15mCaptions(tmp_path / "yfcc15m.pkl")
    (tmp_path / "yfcc15m.pkl").write_bytes(pickle.dumps([(1, "a", "b")]))
    with pytest.raises(FileNotFoundError, match=r"images is not a directory; set data\.train\.root"):
        Yfcc15mCaptions(tmp_path / "yfcc15m.pkl")
    (tmp_path / "images").mkdir()
    (tmp_path / "yfcc15m.pkl").write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match=r"list of \(index, title, description\) tuples"):
        Yfcc15mCaptions(tmp_path / "yfcc15m.pkl")
    (tmp_path / "yfcc15m.pkl").write_bytes(pickle.dumps([(1, "a", "b")]))
    with pytest.raises(ValueError, match=r"data\.train\.max_open_shards must be >= 1"):
        Yfcc15mCaptions(tmp_path / "yfcc15m.pkl", max_open_shards=0)


# COCO


def test_coco_one_sample_per_captioned_image(tmp_path):
    captions = {3: ["three a", "three b", "three c", " ", "three e"], 5: ["five"], 99: ["no such image"]}
    dataset = CocoCaptions(coco_dataset(tmp_path, captions, images=[3, 4, 5]), tmp_path / "train2017")
    assert len(dataset) == 2  # image 4 has no caption; the caption of image 99 has no image
    assert_shows(dataset[0][0], 3)
    assert_shows(dataset[1][0], 5)
    assert draws(dataset, 0) == {"three a", "three b", "three c", "three e"}  # never the blank one
    assert draws(dataset, 1) == {"five"}


def test_coco_errors_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.train\.path"):
        CocoCaptions(tmp_path / "captions.json", tmp_path)
    path = coco_dataset(tmp_path, {1: ["one"]}, images=[1])
    with pytest.raises(FileNotFoundError, match=r"data\.train\.root"):
        CocoCaptions(path, tmp_path / "val2017")
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"need 'images' and 'annotations', got \['categories', 'images'\]"):
        CocoCaptions(path, tmp_path / "train2017")


# Training on each source


def source_overrides(name: str, folder: Path) -> list[str]:
    """`data=<name>` and the paths of a 16-sample dataset of that source written to `folder`."""
    if name == "csv":
        return ["data=csv", f"data.train.path={csv_dataset(folder)}"]
    if name == "yfcc15m":
        path = yfcc_dataset(folder, [(i * 997, f"title {i}", "") for i in range(16)])
        return ["data=yfcc15m", f"data.train.path={path}"]
    path = coco_dataset(folder, {i: [f"caption {i}"] for i in range(16)}, images=range(16))
    return ["data=coco", f"data.train.path={path}", f"data.train.root={folder / 'train2017'}"]


@pytest.mark.parametrize("name", ["csv", "yfcc15m", "coco"])
def test_fast_dev_run_on_each_source(tmp_path, name):
    cfg = run_config(tmp_path / "run", "debug=fast_dev_run", *source_overrides(name, tmp_path / name))
    train(cfg)
