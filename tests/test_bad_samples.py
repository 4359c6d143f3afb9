"""Robustness to real data: unusable samples are skipped and counted, odd image modes converted, and a
run whose bad share is too high stops with an error naming example files."""

from __future__ import annotations

import csv
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from aclip.callbacks.data_quality import BadDataError
from aclip.datamodules.coco import CocoCaptions
from aclip.datamodules.csv_source import CsvCaptions
from aclip.datamodules.datamodule import ImageTextDataset
from aclip.datamodules.images import BAD_COUNT, BAD_NAMES, READ_COUNT, BadSample, clean_caption, load_rgb
from aclip.datamodules.yfcc15m import Yfcc15mCaptions
from aclip.tasks import train
from tests.test_sources import coco_dataset, csv_dataset, image_bytes, run_config, write_csv


def encoded(image: Image.Image, image_format: str) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    buffer.seek(0)
    return buffer


# Decoding: unreadable files are BadSamples, every mode becomes 8-bit RGB.


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cannot decode image"),  # corrupt bytes
        (image_bytes(0, "JPEG")[:300], "cannot decode image"),  # truncated JPEG
        (b"", "cannot decode image"),
        (b"<html>404 Not Found</html>", "cannot decode image"),
        (b"\xff\xd8\xff\xe0" + bytes(1000), "cannot decode image"),  # a JPEG's first bytes only
        (None, "file not found"),
    ],
    ids=["corrupt", "truncated", "empty", "not-an-image", "fake-jpeg", "missing"],
)
def test_unreadable_image_is_a_bad_sample(tmp_path, content, reason):
    path = tmp_path / "image.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadSample, match=reason) as raised:
        load_rgb(path)
    assert raised.value.name == str(path)
    assert "BytesIO" not in str(raised.value)  # the file is named by its path, not the buffer read


def test_an_image_file_too_large_to_be_one_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0")
    os.truncate(path, 200 * 2**20)  # 200 MB that take no disk space (a sparse file)
    with pytest.raises(BadSample, match=r"200 MiB, more than an image file may hold \(64 MiB\)") as raised:
        load_rgb(path)
    assert raised.value.name == str(path)


def test_greyscale_is_replicated():
    rgb = load_rgb(encoded(Image.new("L", (4, 4), 77), "PNG"), "grey")
    assert rgb.mode == "RGB" and np.asarray(rgb).reshape(-1, 3).tolist() == [[77, 77, 77]] * 16


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black
    pixels = np.asarray(load_rgb(encoded(rgba, "PNG"), "rgba"))
    assert pixels.tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_palette_transparency_becomes_white():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([200, 0, 0, 0, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    pixels = np.asarray(load_rgb(encoded(palette, "PNG"), "palette"))
    assert pixels.tolist() == [[[200, 0, 0], [255, 255, 255]]]


def test_cmyk_jpeg_is_converted():
    cyan = load_rgb(encoded(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG"), "cmyk")
    assert cyan.mode == "RGB"
    assert np.abs(np.asarray(cyan, dtype=int) - [0, 255, 255]).max() <= 2


def test_16_bit_greyscale_is_scaled_to_8_bits():
    grey = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert grey.mode == "I;16"
    rgb = load_rgb(encoded(grey, "PNG"), "16-bit")
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]


def test_empty_caption_is_a_bad_sample():
    assert clean_caption("  a dog \n", "x") == "a dog"
    for caption in ("", " \t\n", None):
        with pytest.raises(BadSample, match="empty caption"):
            clean_caption(caption, "x")


# Each source raises BadSample (not another error) for a sample it cannot provide.


def test_csv_source_bad_rows(tmp_path):
    (tmp_path / "good.png").write_bytes(image_bytes(0))
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    rows = [
        ("good.png", "   "),
        ("missing.png", "a caption"),
        ("corrupt.png", "a caption"),
        ("", "a caption"),
    ]
    dataset = CsvCaptions(write_csv(tmp_path / "train.csv", rows))
    reasons = ["empty caption", "file not found", "cannot decode image", "cannot decode image"]
    for index, reason in enumerate(reasons):
        with pytest.raises(BadSample, match=reason):
            dataset[index]


def test_yfcc_source_bad_samples(tmp_path):
    shards = tmp_path / "images" / "00"
    shards.mkdir(parents=True)
    with zipfile.ZipFile(shards / "000.zip", "w") as archive:
        archive.writestr("001.jpg", image_bytes(1, "JPEG"))
        archive.writestr("002.jpg", b"not a JPEG")
    (shards / "005.zip").write_bytes(b"not a zip file")
    with zipfile.ZipFile(shards / "006.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("001.jpg", b"compressible " * 1000)
    damaged = bytearray((shards / "006.zip").read_bytes())
    damaged[40:60] = bytes(20)  # inside the compressed data, after the 37-byte local header
    (shards / "006.zip").write_bytes(damaged)
    cases = [  # (index, title, description), the image's name, why it is bad
        ((1, "", " "), "00/000.zip:001.jpg", "empty caption"),
        ((2, "a", ""), "00/000.zip:002.jpg", "cannot decode image"),
        ((3, "a", ""), "00/000.zip:003.jpg", "not in its zip shard"),
        ((5001, "a", ""), "00/005.zip:001.jpg", "cannot read zip shard"),
        ((6001, "a", ""), "00/006.zip:001.jpg", "cannot read zip shard"),
        ((10_000_001, "a", ""), "10/000.zip:001.jpg", "zip shard not found"),
    ]
    (tmp_path / "yfcc15m.pkl").write_bytes(pickle.dumps([sample for sample, _, _ in cases]))
    dataset = Yfcc15mCaptions(tmp_path / "yfcc15m.pkl")
    for index, (_, name, reason) in enumerate(cases):
        with pytest.raises(BadSample, match=reason) as raised:
            dataset[index]
        assert raised.value.name == str(tmp_path / "images" / name)


def test_coco_source_bad_samples(tmp_path):
    path = coco_dataset(tmp_path, {1: ["one"], 2: ["", "  "]}, images=[1, 2])
    (tmp_path / "train2017" / f"{1:012d}.png").unlink()
    dataset = CocoCaptions(path, tmp_path / "train2017")
    with pytest.raises(BadSample, match="file not found"):
        dataset[0]
    with pytest.raises(BadSample, match="empty caption"):
        dataset[1]


# Skipping and counting in the training dataset.


def caption_only(image: Image.Image, caption: str) -> dict[str, str]:
    return {"caption": caption}


def test_bad_samples_are_replaced_by_the_next_good_one_and_counted_once(tmp_path):
    """A bad index is counted at that index only: the bad ones passed over to reach a substitute are
    counted when their own index is read, so a run of k adjacent bad rows counts k, not k(k+1)/2."""
    dataset = ImageTextDataset(CsvCaptions(csv_dataset(tmp_path, size=6, bad=[1, 2, 5])), caption_only)
    assert dataset[0] == {"caption": "caption 0", BAD_COUNT: 0, READ_COUNT: 1, BAD_NAMES: ""}
    replaced = dataset[1]
    assert replaced["caption"] == "caption 3" and replaced[BAD_COUNT] == 1 and replaced[READ_COUNT] == 1
    assert replaced[BAD_NAMES] == f"{tmp_path / 'images' / '001.png'} (file not found)"
    assert dataset[2][BAD_NAMES] == f"{tmp_path / 'images' / '002.png'} (file not found)"
    assert dataset[5]["caption"] == "caption 0" and dataset[5][BAD_COUNT] == 1  # wraps around
    # Over one epoch (every index once) each of the 3 bad rows is counted once, among 6 read.
    epoch = [dataset[index] for index in range(len(dataset))]
    assert (
        sum(sample[BAD_COUNT] for sample in epoch) == 3 and sum(sample[READ_COUNT] for sample in epoch) == 6
    )


def test_too_many_consecutive_bad_samples_is_an_error(tmp_path):
    source = CsvCaptions(csv_dataset(tmp_path, size=10, bad=range(10)))
    with pytest.raises(RuntimeError, match=r"4 consecutive samples from index 2 could not be read"):
        ImageTextDataset(source, caption_only, max_consecutive_bad=4)[2]


# The monitor during training.


def test_bad_samples_under_the_limit_are_logged_and_training_continues(tmp_path):
    csv_path = csv_dataset(tmp_path / "data", size=24, bad=[7])
    cfg = run_config(
        tmp_path / "run",
        "data=csv",
        f"data.train.path={csv_path}",
        "callbacks.bad_samples.max_fraction=0.2",  # 1 of 9 if the first batch has it
        "callbacks.bad_samples.min_samples=1",
        "trainer.log_every_n_steps=1",
    )
    train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("data/bad_samples")]
    assert len(rows) == 3  # 24 samples in batches of 8
    assert float(rows[-1]["data/bad_samples"]) == 1.0
    assert float(rows[-1]["data/bad_fraction"]) == pytest.approx(1 / 24)


@pytest.mark.parametrize("min_samples", [1, 10_000], ids=["judged-every-step", "judged-at-epoch-end"])
def test_too_many_bad_samples_stop_the_run_naming_examples(tmp_path, min_samples):
    bad = [3, 11, 20]
    csv_path = csv_dataset(tmp_path / "data", size=24, bad=bad)
    cfg = run_config(
        tmp_path / "run",
        "data=csv",
        f"data.train.path={csv_path}",
        f"callbacks.bad_samples.min_samples={min_samples}",
    )
    with pytest.raises(BadDataError, match=r"callbacks\.bad_samples\.max_fraction") as raised:
        train(cfg)
    message = str(raised.value)
    named = [index for index in bad if f"images/{index:03d}.png (file not found)" in message]
    assert named, message
    if min_samples > 1:
        assert "3 of 24 training samples" in message and len(named) == 3
        # The epoch trained before the bad share was judged at its end: it is kept.
        assert "Saved" in message and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_adjacent_bad_rows_count_once_each_and_pass_a_one_percent_limit(tmp_path):
    """5 adjacent missing rows of 1,000 are 0.5 %: counted exactly 5, under the 1 % limit."""
    csv_path = csv_dataset(tmp_path / "data", size=1000, bad=range(500, 505))
    cfg = run_config(
        tmp_path / "run",
        "data=csv",
        f"data.train.path={csv_path}",
        "data.batch_size=100",
        "evaluation.at_end=false",
        "trainer.log_every_n_steps=1",
    )
    train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("data/bad_samples")]
    assert float(rows[-1]["data/bad_samples"]) == 5.0
    assert float(rows[-1]["data/bad_fraction"]) == pytest.approx(0.005)


def test_bad_samples_are_named_in_the_log(tmp_path, caplog):
    csv_path = csv_dataset(tmp_path / "data", size=24, bad=[7])
    cfg = run_config(
        tmp_path / "run", "data=csv", f"data.train.path={csv_path}", "callbacks.bad_samples.max_fraction=0.1"
    )
    with caplog.at_level("WARNING", logger="aclip.callbacks.data_quality"):
        train(cfg)
    assert any("007.png (file not found)" in record.getMessage() for record in caplog.records)
