"""Training pairs streamed from webdataset tar shards, such as img2dataset's `--output_format webdataset`."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from aclip.datamodules.images import BadSample, clean_caption, open_image, skip_record

log = logging.getLogger(__name__)

Prepare = Callable[[Image.Image, str], dict[str, Tensor]]


class WebDatasetSource:
    """(image, caption) pairs read as a stream from tar shards: a `StreamingSource` for `ClipDataModule`.

    The members of a shard form samples by their name up to the first dot (`000123.jpg` and
    `000123.txt` are one sample). A sample's image is its first member with one of `image_keys`, its
    caption the first with one of `caption_keys` (from a `.json` member, its `caption_field`). Samples
    whose image or caption is missing or unreadable are skipped and counted (`skip_record`). A shard
    that cannot be opened or read to its end (truncated, corrupt) is logged by name, once per process, and
    the samples it did not deliver are counted as bad every time it is read: its expected size is the
    `successes` of img2dataset's `<shard>_stats.json` beside it, else `num_samples` over the number of
    shards. A dataloader worker that meets its share of a whole epoch in bad samples without one good
    sample ends its epoch, so that a stream of broken shards stops with `BadSampleMonitor`'s error in
    either mode below instead of drawing them forever.

    An epoch is read in one of two ways:

    * `resampled=False`: every shard once. The shards are dealt out to the ranks and then to their
      dataloader workers, so there must be at least ranks x workers of them, and with shards of equal
      size every sample is read exactly once per epoch. A worker whose shards run out early ends its
      share of the epoch early: the epoch then has fewer batches than `len()`, and with several ranks the
      rank that stops first leaves the others waiting. Use this mode on one node, with even shards.
    * `resampled=True`: every worker draws shards at random, with replacement, with its own seed, and an
      epoch is `num_samples` samples. Epochs have exactly `len()` batches on every rank whatever the
      shards: the mode for multi-node runs, and the one that mixes sources by `weights`.

    Epochs are counted by each copy of the pipeline, so the order changes from epoch to epoch with
    persistent dataloader workers (as `ClipDataModule` uses) or none.

    Args:
        urls: the shards, as a brace pattern (`/data/{00000..00099}.tar`) or a list of patterns (several
            sources joined). `pipe:` commands and URLs are passed to webdataset as they are.
        num_samples: samples per epoch over all ranks (a stream has no length of its own).
        resampled: draw shards at random with replacement instead of reading each once per epoch.
        weights: the share of samples from each pattern of `urls` (needs `resampled`); without them
            every shard is equally likely, so each source counts by its number of shards.
        shard_shuffle: shuffle the shard order every epoch (resampled shards are random anyway).
        shuffle_buffer: samples each worker holds to shuffle, read before its first batch (0: in order).
        seed: seeds the shard order (one for all ranks), the shuffle buffers (one per rank) and the
            resampled shard draws (one per worker), differently every epoch.
        image_keys, caption_keys: member extensions to look for, in order of preference.
        caption_field: the caption's field in a `.json` member (img2dataset's: `caption`).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        num_samples: int,
        resampled: bool = False,
        weights: Sequence[float] | None = None,
        shard_shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: Sequence[str] = ("txt", "json"),
        caption_field: str = "caption",
    ) -> None:
        patterns = [urls] if isinstance(urls, str) else list(urls)
        if not patterns:
            raise ValueError("data.train.urls is empty; give a pattern such as /data/{00000..00099}.tar")
        if num_samples < 1 or shuffle_buffer < 0:
            raise ValueError(
                f"need data.train.num_samples >= 1 and data.train.shuffle_buffer >= 0; got {num_samples}, "
                f"{shuffle_buffer}"
            )
        if weights is not None:
            _check_weights(list(weights), len(patterns), resampled)
        self.sources = [list(braceexpand.braceexpand(pattern)) for pattern in patterns]
        _check_shards_exist(self.shards)
        self.num_samples, self.resampled = num_samples, resampled
        self.weights = None if weights is None else [float(weight) for weight in weights]
        self.shard_shuffle, self.shuffle_buffer, self.seed = shard_shuffle, shuffle_buffer, seed
        self.image_keys, self.caption_keys = tuple(image_keys), tuple(caption_keys)
        self.caption_field = caption_field
        # Shards already reported unreadable (by this process: each dataloader worker keeps its own copy).
        self._warned: set[str] = set()

    @property
    def shards(self) -> list[str]:
        """Every shard of every source."""
        return [url for urls in self.sources for url in urls]

    def batches(
        self, prepare: Prepare, batch_size: int, rank: int, world_size: int, num_workers: int
    ) -> IterableDataset:
        """This rank's collated batches of `prepare(image, caption)` samples, `len()` of them per epoch."""
        workers = max(1, num_workers)
        per_worker = self._batches_per_worker(batch_size, world_size, workers)
        return _SizedPipeline(
            self._samples(rank, world_size),
            _shuffle(self.shuffle_buffer, wds.utils.make_seed(self.seed, rank)),
            partial(
                self._prepared, prepare=prepare, give_up_after=max(per_worker * batch_size, _GIVE_UP_FLOOR)
            ),
            wds.batched(batch_size, collation_fn=default_collate, partial=False),
            wds.slice(per_worker),  # each worker's share of the epoch: resampled streams are endless
            length=per_worker * workers,
        )

    def _batches_per_worker(self, batch_size: int, world_size: int, workers: int) -> int:
        """Batches per epoch of each dataloader worker, the same on every rank; checks the shards suffice."""
        per_worker = self.num_samples // (batch_size * world_size) // workers
        if per_worker == 0:
            raise ValueError(
                f"data.train.num_samples={self.num_samples} does not fill one batch of {batch_size} for each "
                f"of {world_size} ranks x {workers} dataloader workers; raise it, or lower data.batch_size "
                "or data.num_workers"
            )
        if not self.resampled and len(self.shards) < world_size * workers:
            raise ValueError(
                f"{len(self.shards)} shards cannot be dealt out to {world_size} ranks x {workers} dataloader "
                f"workers = {world_size * workers} readers, each of which needs a shard of its own; write "
                "more (smaller) shards, lower data.num_workers, or set data.train.resampled=true"
            )
        return per_worker

    def _samples(self, rank: int, world_size: int) -> IterableDataset:
        """The raw samples (dicts of member bytes) that this rank's current worker reads."""
        if self.weights is not None:
            per_source = [self._resampled(urls, rank, index) for index, urls in enumerate(self.sources)]
            return wds.RandomMix(per_source, self.weights)
        if self.resampled:
            return self._resampled(self.shards, rank, 0)
        return wds.DataPipeline(
            wds.SimpleShardList(self.shards),
            # The same order on every rank and worker (seeded by the epoch alone), before they split it.
            _shuffle(len(self.shards), self.seed) if self.shard_shuffle else None,
            # The trainer's rank, where webdataset's split_by_node would read it from the environment.
            wds.slice(rank, None, world_size),
            wds.split_by_worker,
            partial(_read_shards, expected=self._expected_samples, warned=self._warned),
        )

    def _resampled(self, urls: list[str], rank: int, source: int) -> IterableDataset:
        shards = wds.ResampledShards(
            urls,
            seed=wds.utils.make_seed(self.seed, source),
            worker_seed=partial(_worker_seed, rank),
            deterministic=True,
        )
        return wds.DataPipeline(
            shards, partial(_read_shards, expected=self._expected_samples, warned=self._warned)
        )

    def _expected_samples(self, url: str) -> int:
        """How many samples the shard `url` holds: img2dataset's count for it, else the average."""
        stats = Path(url).with_name(Path(url).stem + "_stats.json") if not _is_remote(url) else None
        if stats is not None and stats.is_file():
            try:
                return int(json.loads(stats.read_text())["successes"])
            except (ValueError, KeyError, TypeError):
                pass
        return max(1, round(self.num_samples / len(self.shards)))

    def _prepared(
        self, samples: Iterable[dict[str, Any]], prepare: Prepare, give_up_after: int
    ) -> Iterator[dict[str, Any]]:
        """`prepare`d pairs; bad samples (and the lost part of a broken shard) are skipped and recorded in
        the next good one (`skip_record`), or, at the end of the stream, in the last one.

        A worker that meets `give_up_after` bad samples in a row (its share of a whole epoch, at least
        `_GIVE_UP_FLOOR`) without a good one ends its stream: a resampled stream of broken shards would
        otherwise draw them forever. The epoch then yields too few batches, which `BadSampleMonitor`
        reports, as in the default mode.
        """
        skipped = _SkippedSamples()
        held: tuple[dict[str, Any], list[BadSample]] | None = None  # yielded once the next one is known
        for sample in samples:
            try:
                if _LOST in sample:
                    raise sample[_LOST]
                prepared = prepare(*self._pair(sample))  # `prepare` decodes the image
            except BadSample as bad:
                skipped.add(bad)
                if skipped.count >= give_up_after:
                    log.warning(
                        "webdataset: %d samples in a row could not be used (this worker's share of an "
                        "epoch), the last %s; ending this worker's epoch. Check data.train.urls",
                        skipped.count,
                        bad,
                    )
                    break
                continue
            if held is not None:
                yield _recorded(*held)
            held, skipped = (prepared, skipped.record()), _SkippedSamples()
        if held is not None:
            yield _recorded(held[0], held[1] + skipped.record())

    def _pair(self, sample: dict[str, Any]) -> tuple[Image.Image, str]:
        name = f"{sample['__url__']}/{sample['__key__']}"
        image_key = _first_member(sample, self.image_keys, "image", name)
        caption_key = _first_member(sample, self.caption_keys, "caption", name)
        caption = self._caption(sample[caption_key], caption_key, f"{name}.{caption_key}")
        return open_image(io.BytesIO(sample[image_key]), name=f"{name}.{image_key}"), caption

    def _caption(self, data: bytes, key: str, name: str) -> str:
        try:
            text = data.decode("utf-8")
            if key == "json":
                record = json.loads(text)
                text = record.get(self.caption_field) if isinstance(record, dict) else None
        except ValueError as error:  # invalid UTF-8 or JSON
            raise BadSample(name, f"cannot read the caption ({type(error).__name__}: {error})") from None
        return clean_caption(text if isinstance(text, str) else None, name)


class _SkippedSamples:
    """The bad samples skipped since the last good one, in bounded memory: the count of all of them and
    the first `_MAX_NAMED` by name (the rest stand as one entry with their count)."""

    def __init__(self) -> None:
        self.named: list[BadSample] = []
        self.count = 0
        self._unnamed = 0

    def add(self, bad: BadSample) -> None:
        self.count += bad.count
        if len(self.named) < _MAX_NAMED:
            self.named.append(bad)
        else:
            self._unnamed += bad.count

    def record(self) -> list[BadSample]:
        """What `skip_record` takes: the named samples, and one entry counting the others."""
        if not self._unnamed:
            return self.named
        return [*self.named, BadSample("(more)", "further bad samples, not named", count=self._unnamed)]


# Bad samples named in the record of one good sample; the others are counted only.
_MAX_NAMED = 20
# The fewest bad samples in a row after which a worker ends its epoch, whatever the epoch's length: a tiny
# epoch may still be surrounded by runs of bad files, and data with bad samples scattered at the 1 % that
# `BadSampleMonitor` tolerates never shows a run this long.
_GIVE_UP_FLOOR = 1000


def _recorded(sample: dict[str, Any], skipped: list[BadSample]) -> dict[str, Any]:
    """A prepared stream sample with the record of the bad ones skipped before it (read: all of them)."""
    return {**sample, **skip_record(skipped, read=1 + sum(bad.count for bad in skipped))}


class _SizedPipeline(wds.DataPipeline):
    """A webdataset pipeline whose `len()` is the batches per epoch that the trainer plans with.

    (`DataPipeline.with_length` builds a class at run time, which spawned dataloader workers cannot unpickle.)
    """

    def __init__(self, *stages: Any, length: int) -> None:
        super().__init__(*stages)
        self.batches_per_epoch = length

    def __len__(self) -> int:
        return self.batches_per_epoch


def _check_weights(weights: list[float], num_patterns: int, resampled: bool) -> None:
    if not resampled:
        raise ValueError(
            "data.train.weights mix the sources sample by sample, which needs data.train.resampled=true"
        )
    if len(weights) != num_patterns or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"data.train.weights={weights} must hold one weight >= 0 per pattern of data.train.urls "
            f"({num_patterns}), not all zero"
        )


def _check_shards_exist(urls: list[str]) -> None:
    """Raise `FileNotFoundError` naming the local shards that do not exist (commands and URLs pass)."""
    missing = [url for url in urls if not _is_remote(url) and not Path(url).is_file()]
    if missing:
        examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of data.train.urls do not exist: {examples}; fix the "
            "pattern (e.g. '/data/shards/{00000..00099}.tar', quoted on the command line) or paths.data_dir"
        )


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _first_member(sample: dict[str, Any], keys: Sequence[str], kind: str, name: str) -> str:
    """The first of `keys` that `sample` has a member for; `BadSample` if none."""
    for key in keys:
        if key in sample:
            return key
    raise BadSample(name, f"no {kind} member (looked for {', '.join('.' + key for key in keys)})")


def _shuffle(size: int, seed: int) -> wds.detshuffle | None:
    """A stage shuffling through a buffer of `size` items by `seed` and the epoch it counts (0: no stage)."""
    return wds.detshuffle(size, initial=size, seed=seed) if size else None


# A stream item standing for the samples a broken shard did not deliver: {_LOST: BadSample(count=n)}.
_LOST = "__lost__"


def _read_shards(
    shards: Iterable[dict[str, Any]], expected: Callable[[str], int], warned: set[str]
) -> Iterator[dict[str, Any]]:
    """The samples of each shard (`{"url": ...}` items) in order. A shard that cannot be opened or read to
    its end-of-archive marker yields what it could, then one `_LOST` item counting what it did not; it is
    logged the first time only (its URL joins `warned`), since a resampled stream may draw it again."""
    for shard in shards:
        url, delivered = shard["url"], 0
        try:
            for sample in wds.tariterators.group_by_keys(_members(url)):
                delivered += 1
                yield sample
        except Exception as error:  # tar, gzip and I/O errors alike
            lost = max(1, expected(url) - delivered)
            reason = (
                f"unreadable after {delivered} samples, about {lost} lost ({type(error).__name__}: {error})"
            )
            if url not in warned:
                warned.add(url)
                log.warning(
                    "webdataset shard %s: %s (reported once; its samples are counted each time)", url, reason
                )
            yield {_LOST: BadSample(url, reason, count=lost)}


class _EndCheckedTarInfo(tarfile.TarInfo):
    """Records how a tar stream ended: Python's tarfile ends a stream that stops between two members, or
    inside a header, as quietly as one that reaches its end-of-archive marker (zero blocks)."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.reached_end_marker = True
            raise


def _members(url: str) -> Iterator[dict[str, Any]]:
    """The regular files of the tar shard `url` (a path, `pipe:` command or URL, as webdataset opens it),
    as webdataset's `group_by_keys` takes them; raises `tarfile.ReadError` if the shard is cut short."""
    with (
        contextlib.closing(wds.gopen(url)) as stream,
        tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckedTarInfo) as archive,
    ):
        for info in archive:
            if info.isreg() and not info.name.startswith("__"):
                yield {"fname": info.name, "data": archive.extractfile(info).read(), "__url__": url}
            archive.members = []  # a stream's members need not be kept
        if not getattr(archive, "reached_end_marker", False):
            raise tarfile.ReadError("the shard ends before its end-of-archive marker (truncated)")


def _worker_seed(rank: int) -> int:
    """A seed for this rank's current dataloader worker (webdataset's default reads the rank from the env)."""
    worker = get_worker_info()
    return rank * 1000 + (worker.id if worker is not None else 0)
