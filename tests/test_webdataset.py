"""The webdataset training source: shards, splitting by rank and worker, resampling, mixing, bad samples."""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from aclip.callbacks.data_quality import BadDataError
from aclip.datamodules.images import decode_pixels
from aclip.datamodules.webdataset_source import WebDatasetSource
from aclip.tasks import train
from tests.helpers import deadline


def encoded(image_format: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (40, 40), "orange").save(buffer, image_format)
    return buffer.getvalue()


JPEG = encoded("JPEG")


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """A shard holding `(key, {extension: bytes})` samples, members in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, num_shards: int, per_shard: int, first_id: int = 0) -> str:
    """Shards 00000.tar, ... of JPEG + "sample <id>" pairs, ids counting up; returns their brace pattern."""
    for shard in range(num_shards):
        numbers = range(first_id + shard * per_shard, first_id + (shard + 1) * per_shard)
        write_tar(
            directory / f"{shard:05d}.tar",
            ((f"{i:06d}", {"jpg": JPEG, "txt": b"sample %d" % i}) for i in numbers),
        )
    return f"{directory}/{{00000..{num_shards - 1:05d}}}.tar"


def sample_id(image: Image.Image, caption: str) -> dict[str, torch.Tensor]:
    """The training sample of a test: the id its caption ends with."""
    return {"id": torch.tensor(int(caption.split()[-1]))}


def ids(batches: Iterable[dict]) -> list[int]:
    return [int(i) for batch in batches for i in batch["id"]]


def test_ranks_and_workers_read_every_sample_once(tmp_path):
    pattern = write_shards(tmp_path, num_shards=8, per_shard=6)  # two shards for each of 2 ranks x 2 workers
    source = WebDatasetSource(pattern, num_samples=48)
    seen = []
    for rank in range(2):
        batches = source.batches(sample_id, batch_size=3, rank=rank, world_size=2, num_workers=2)
        loaded = list(DataLoader(batches, batch_size=None, num_workers=2))
        assert len(loaded) == len(batches) == 8
        seen += ids(loaded)
    assert sorted(seen) == list(range(48))


def test_order_is_seeded_and_changes_every_epoch(tmp_path):
    pattern = write_shards(tmp_path, num_shards=4, per_shard=8)

    def two_epochs(**options) -> list[list[int]]:
        batches = WebDatasetSource(pattern, num_samples=32, **options).batches(sample_id, 4, 0, 1, 0)
        return [ids(batches), ids(batches)]

    first, second = two_epochs(shuffle_buffer=8)
    assert sorted(first) == sorted(second) == list(range(32))
    assert first != second
    assert two_epochs(shuffle_buffer=8) == [first, second]
    assert two_epochs(shuffle_buffer=8, seed=1)[0] != first
    assert two_epochs(shard_shuffle=False, shuffle_buffer=0) == [list(range(32))] * 2


def test_fewer_shards_than_ranks_times_workers_is_an_error(tmp_path):
    pattern = write_shards(tmp_path, num_shards=3, per_shard=4)
    source = WebDatasetSource(pattern, num_samples=12)
    with pytest.raises(ValueError, match=r"3 shards .* 2 ranks x 2 dataloader workers = 4 .*resampled=true"):
        source.batches(sample_id, batch_size=1, rank=0, world_size=2, num_workers=2)
    resampled = WebDatasetSource(pattern, num_samples=12, resampled=True)
    assert len(resampled.batches(sample_id, batch_size=1, rank=0, world_size=2, num_workers=2)) == 6


def test_epoch_length_is_a_multiple_of_the_workers(tmp_path):
    source = WebDatasetSource(write_shards(tmp_path, num_shards=10, per_shard=2), num_samples=100)
    assert len(source.batches(sample_id, batch_size=4, rank=0, world_size=2, num_workers=5)) == 10
    with pytest.raises(ValueError, match="num_samples=100 does not fill one batch"):
        source.batches(sample_id, batch_size=4, rank=0, world_size=2, num_workers=16)


def test_resampled_epochs_have_the_fixed_length_and_draws_of_their_own(tmp_path):
    pattern = write_shards(tmp_path, num_shards=8, per_shard=5)
    source = WebDatasetSource(pattern, num_samples=80, resampled=True, shuffle_buffer=0)
    ranks = [
        source.batches(sample_id, batch_size=4, rank=rank, world_size=2, num_workers=0) for rank in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 10  # 80 samples / (4 x 2 ranks), more than the 40 in the shards
    epochs = [[ids(batches) for _ in range(2)] for batches in ranks]
    assert all(len(epoch) == 40 for rank in epochs for epoch in rank)
    assert epochs[0][0] != epochs[0][1] and epochs[0][0] != epochs[1][0]  # per epoch and per rank
    again = WebDatasetSource(pattern, num_samples=80, resampled=True, shuffle_buffer=0)
    assert ids(again.batches(sample_id, batch_size=4, rank=0, world_size=2, num_workers=0)) == epochs[0][0]


def test_weights_mix_the_sources(tmp_path):
    common = write_shards(tmp_path / "common", num_shards=2, per_shard=10)
    rare = write_shards(tmp_path / "rare", num_shards=2, per_shard=10, first_id=1000)
    source = WebDatasetSource([common, rare], num_samples=500, resampled=True, weights=[0.9, 0.1])
    random.seed(0)  # webdataset's RandomMix draws from Python's global generator
    drawn = ids(source.batches(sample_id, batch_size=20, rank=0, world_size=1, num_workers=0))
    assert len(drawn) == 500
    assert 0.05 < sum(i >= 1000 for i in drawn) / len(drawn) < 0.15


def test_weights_need_resampling_and_one_per_pattern(tmp_path):
    patterns = [write_shards(tmp_path / "a", 1, 1), write_shards(tmp_path / "b", 1, 1)]
    with pytest.raises(ValueError, match="resampled=true"):
        WebDatasetSource(patterns, num_samples=2, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="one weight >= 0 per pattern"):
        WebDatasetSource(patterns, num_samples=2, resampled=True, weights=[1.0])


def test_brace_patterns_and_lists_of_them_are_joined(tmp_path):
    first = write_shards(tmp_path / "first", num_shards=3, per_shard=2)
    second = write_shards(tmp_path / "second", num_shards=2, per_shard=2, first_id=100)
    source = WebDatasetSource([first, second], num_samples=10)
    assert len(source.shards) == 5
    assert sorted(ids(source.batches(sample_id, 2, 0, 1, 0))) == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103]


def test_png_webp_jpeg_and_json_captions_are_read(tmp_path):
    shard = tmp_path / "00000.tar"
    write_tar(
        shard,
        [
            ("a", {"png": encoded("PNG", "RGBA"), "txt": b"sample 0"}),
            (
                "b",
                {"webp": encoded("WEBP"), "json": json.dumps({"caption": "sample 1", "url": "x"}).encode()},
            ),
            ("c", {"jpeg": JPEG, "json": b'{"caption": " sample 2 "}'}),
            ("d", {"jpg": JPEG, "txt": b"sample 3", "json": b'{"caption": "sample 99"}'}),  # .txt preferred
        ],
    )

    def prepare(image: Image.Image, caption: str) -> dict[str, torch.Tensor]:
        # Opened, not decoded: `prepare` decodes it, whatever the file's mode, to 8-bit RGB pixels.
        assert decode_pixels(image).shape == (3, 40, 40)
        return sample_id(image, caption)

    source = WebDatasetSource(str(shard), num_samples=4, shard_shuffle=False, shuffle_buffer=0)
    (batch,) = source.batches(prepare, batch_size=4, rank=0, world_size=1, num_workers=0)
    assert batch["id"].tolist() == [0, 1, 2, 3]
    assert batch["bad_samples"].tolist() == [0, 0, 0, 0]


def test_bad_samples_are_skipped_and_reported_with_the_next_good_one(tmp_path):
    shard = tmp_path / "00000.tar"
    write_tar(
        shard,
        [
            ("a", {"jpg": JPEG, "txt": b"sample 0"}),
            ("b", {"jpg": b"not an image", "txt": b"sample 1"}),
            ("c", {"jpg": JPEG, "txt": b"  \n"}),
            ("d", {"jpg": JPEG}),
            ("e", {"txt": b"sample 4"}),
            ("f", {"jpg": JPEG, "json": b"{not json"}),
            ("g", {"jpg": JPEG, "txt": b"sample 6"}),
        ],
    )
    source = WebDatasetSource(str(shard), num_samples=2, shard_shuffle=False, shuffle_buffer=0)
    first, second = source.batches(sample_id, batch_size=1, rank=0, world_size=1, num_workers=0)
    assert first["id"].tolist() == [0] and first["bad_samples"].tolist() == [0]
    assert second["id"].tolist() == [6] and second["bad_samples"].tolist() == [5]
    reported = second["bad_names"][0].splitlines()
    expected = [
        ("b.jpg", "cannot decode image"),
        ("c.txt", "empty caption"),
        ("d", "no caption member"),
        ("e", "no image member"),
        ("f.json", "cannot read the caption"),
    ]
    assert len(reported) == len(expected)
    for line, (member, reason) in zip(reported, expected, strict=True):
        assert line.startswith(f"{shard}/{member} (") and reason in line


def test_unreadable_shard_is_skipped_with_a_warning(tmp_path, caplog):
    write_shards(tmp_path, num_shards=3, per_shard=4)
    (tmp_path / "00001.tar").write_bytes(b"not a tar file")
    source = WebDatasetSource(f"{tmp_path}/{{00000..00002}}.tar", num_samples=8, shard_shuffle=False)
    with caplog.at_level(logging.WARNING):
        read = ids(source.batches(sample_id, batch_size=2, rank=0, world_size=1, num_workers=0))
    assert sorted(read) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert f"{tmp_path}/00001.tar" in caplog.text


def test_truncated_shard_counts_the_samples_it_lost(tmp_path, caplog):
    """6 shards of 16: the third cut in half delivers its first samples; the rest count as bad samples,
    named by the shard, so that read + lost is the whole epoch."""
    pattern = write_shards(tmp_path, num_shards=6, per_shard=16)
    broken = tmp_path / "00002.tar"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    source = WebDatasetSource(pattern, num_samples=96, shard_shuffle=False, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        batches = list(source.batches(sample_id, batch_size=1, rank=0, world_size=1, num_workers=0))
    delivered = [i for i in ids(batches) if 32 <= i < 48]
    assert 0 < len(delivered) < 16
    lost = sum(int(batch["bad_samples"].sum()) for batch in batches)
    assert lost == 16 - len(delivered)
    assert sum(int(batch["samples_read"].sum()) for batch in batches) == 96
    assert "00002.tar" in "".join(name for batch in batches for name in batch["bad_names"])
    assert "00002.tar" in caplog.text


def test_img2dataset_stats_give_a_shards_expected_size(tmp_path):
    pattern = write_shards(tmp_path, num_shards=2, per_shard=4)
    (tmp_path / "00001.tar").write_bytes(b"garbage")
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 9, "count": 10}))
    source = WebDatasetSource(pattern, num_samples=8, shard_shuffle=False, shuffle_buffer=0)
    batches = list(source.batches(sample_id, batch_size=1, rank=0, world_size=1, num_workers=0))
    assert sum(int(batch["bad_samples"].sum()) for batch in batches) == 9


def test_garbage_shards_stop_the_run_with_a_bad_data_error(train_config, tmp_path):
    """Every shard corrupt: no batch at all is a bad-data error, not a successful run of 0 steps."""
    pattern = write_shards(tmp_path / "shards", num_shards=4, per_shard=8)
    for shard in (tmp_path / "shards").glob("*.tar"):
        shard.write_bytes(b"\x00garbage" * 100)
    cfg = train_config("data=webdataset", f"data.train.urls='{pattern}'", "data.train.num_samples=32")
    with pytest.raises(BadDataError, match=r"could not be read|planned batches"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_missing_shards_are_named_at_construction(tmp_path):
    write_shards(tmp_path, num_shards=2, per_shard=1)
    pattern = f"{tmp_path}/{{00000..00002}}.tar"
    with pytest.raises(
        FileNotFoundError, match=r"1 of 3 shards of data.train.urls do not exist: .*00002\.tar"
    ):
        WebDatasetSource(pattern, num_samples=3)
    WebDatasetSource(f"pipe:cat {pattern}", num_samples=3)  # commands (and URLs) are not checked


def test_training_runs_from_shards(train_config, tmp_path):
    pattern = write_shards(tmp_path / "shards", num_shards=4, per_shard=8)
    cfg = train_config(
        "data=webdataset",
        f"data.train.urls='{pattern}'",
        "data.train.num_samples=32",
        "evaluation.at_end=false",
    )
    train(cfg)
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["optimizer_steps"] == 4  # 32 samples in batches of 8


def test_resampled_garbage_shards_stop_the_run_warning_once_per_shard(train_config, tmp_path, caplog):
    """The multi-node mode with every shard corrupt ends as the default mode does (a bad-data error), in
    bounded time, naming each shard once, not once per draw."""
    pattern = write_shards(tmp_path / "shards", num_shards=4, per_shard=8)
    for shard in (tmp_path / "shards").glob("*.tar"):
        shard.write_bytes(b"\x00garbage" * 100)
    cfg = train_config(
        "data=webdataset",
        f"data.train.urls='{pattern}'",
        "data.train.num_samples=32",
        "data.train.resampled=true",
    )
    # The run used to draw the broken shards forever, its memory growing: now it must end within a minute.
    with caplog.at_level(logging.WARNING), pytest.raises(BadDataError, match="planned batches"), deadline(60):
        train(cfg)
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        assert caplog.text.count(f"webdataset shard {shard}:") <= 1
    assert "samples in a row could not be used" in caplog.text
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_long_run_of_bad_samples_is_counted_exactly_in_bounded_memory(tmp_path):
    """Thousands of bad samples before a good one: all counted, 20 named, the rest summed in one entry."""
    source = WebDatasetSource(write_shards(tmp_path, num_shards=1, per_shard=1), num_samples=1)
    bad = ({"__url__": "s.tar", "__key__": f"{i:06d}", "txt": b"no image"} for i in range(5000))
    good = {"__url__": "s.tar", "__key__": "good", "jpg": JPEG, "txt": b"sample 7"}
    samples = list(source._prepared([*bad, good], prepare=sample_id, give_up_after=10_000))
    assert len(samples) == 1 and samples[0]["bad_samples"] == 5000 and samples[0]["samples_read"] == 5001
    names = samples[0]["bad_names"].split("\n")
    assert len(names) == 21 and names[-1].startswith("(more) (") and "s.tar/000019" in names[19]


def test_an_endless_stream_of_bad_samples_ends_after_an_epochs_worth(tmp_path, caplog):
    source = WebDatasetSource(write_shards(tmp_path, num_shards=1, per_shard=1), num_samples=1)
    endless = ({"__url__": "s.tar", "__key__": str(i), "txt": b"no image"} for i in itertools.count())
    with caplog.at_level(logging.WARNING):
        assert list(source._prepared(endless, prepare=sample_id, give_up_after=64)) == []
    assert "64 samples in a row could not be used" in caplog.text
