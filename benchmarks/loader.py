"""Data-loading throughput per worker: every training source and method against open_clip's transform.

Each pipeline is the project's own: the configured source (`data=csv`, `webdataset`, `yfcc15m`, `coco`,
or the built-in `synthetic`) through `ClipDataModule.prepare_pair` (decode, the method's views and
teacher crop as uint8, tokenisation) and collation into batches, in this one process, as one dataloader
worker runs it. The files are a fixture of web-size JPEGs (about 500 x 375, quality 90) that the script
writes once under `--fixture` and lists or packs in each source's own layout. The reference is
open_clip's training pipeline on the same files: `Image.open`, `image_transform(224, is_train=True)`
(one view, float, normalised) and `open_clip.tokenize`. Pipelines take turns, round after round in
rotated order; a pipeline's rate is its median over the rounds. The csv pipelines' image stages take
their turns too (the transform on the opened file: decoding and the views; and the views alone, from
pixels decoded beforehand), which bound the rate before the Python around them. A cProfile of one
pipeline shows where its time goes. The report is printed and appended to BENCHMARKS.md.

    python -m benchmarks.loader                          # every source x clip, aclip, aclip_eff
    python -m benchmarks.loader --sources csv --methods aclip --profile csv:aclip
    python -m benchmarks.loader --quick                  # 32 px, a few samples: checks that it runs
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pickle
import pstats
import statistics
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import default_collate

from aclip.cli import compose
from aclip.datamodules.datamodule import ClipDataModule, ImageTextDataset
from aclip.datamodules.images import decode_pixels, open_image
from aclip.datamodules.yfcc15m import shard_member
from aclip.modules.masking import build_policy
from benchmarks.reporting import add_output_arguments, device_name, report_head, run_benchmark
from benchmarks.timing import CLOCKS, add_clock_argument

SOURCES = ("csv", "webdataset", "yfcc15m", "coco", "synthetic")
METHODS = ("clip", "aclip", "aclip_eff")
REFERENCE = "open_clip"
CAPTION = "a photo of a scene number {} with several objects in it"


def write_fixture(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` web-size JPEGs (500 x 375 or 375 x 500, quality 90) with detail at every scale, written
    once (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:05d}.jpg" for index in range(count)]
    rng = np.random.default_rng(seed)
    for index, path in enumerate(paths):
        if path.is_file():
            continue
        width, height = (500, 375) if index % 4 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height))
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.asarray(coarse, dtype=np.float32) * 0.7 + rng.normal(0, 12, (height, width, 3))
        pixels += np.stack([x / width, y / height, np.sin(x / 7.0) * np.cos(y / 5.0)], -1) * 60
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return paths


def source_overrides(source: str, images: list[Path], folder: Path) -> list[str]:
    """Lay the fixture out as `source` reads it (once) and return the `data.train` overrides for it."""
    if source == "synthetic":
        return []
    if source == "csv":
        table = folder / "train.tsv"
        if not table.is_file():
            rows = [f"{path.name}\t{CAPTION.format(i)}" for i, path in enumerate(images)]
            table.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
        return [f"data.train.path={table}", f"data.train.root={images[0].parent}"]
    if source == "webdataset":
        shards = folder / "shards"
        if not shards.is_dir():
            shards.mkdir()
            for shard, start in enumerate(range(0, len(images), 128)):
                with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
                    for index, path in enumerate(images[start : start + 128], start=start):
                        for suffix, data in (
                            (".jpg", path.read_bytes()),
                            (".txt", CAPTION.format(index).encode()),
                        ):
                            info = tarfile.TarInfo(f"{index:06d}{suffix}")
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
        last = -(-len(images) // 128) - 1
        return [
            f"data.train.urls='{shards}/{{00000..{last:05d}}}.tar'",
            f"data.train.num_samples={len(images)}",
        ]
    if source == "yfcc15m":
        root = folder / "yfcc15m"
        if not root.is_dir():
            samples = []
            for index, path in enumerate(images):
                image_index = 1_000 + index
                shard, member = shard_member(image_index)
                (root / "images" / shard).parent.mkdir(parents=True, exist_ok=True)
                with zipfile.ZipFile(root / "images" / shard, "a") as archive:
                    archive.writestr(member, path.read_bytes())
                samples.append((image_index, CAPTION.format(index), ""))
            (root / "yfcc15m.pkl").write_bytes(pickle.dumps(samples))
        return [f"data.train.path={root / 'yfcc15m.pkl'}"]
    if source == "coco":
        root = folder / "coco"
        annotations = root / "captions.json"
        if not annotations.is_file():
            root.mkdir(parents=True, exist_ok=True)
            listing = {
                "images": [{"id": i, "file_name": path.name} for i, path in enumerate(images)],
                "annotations": [
                    {"image_id": i, "id": i, "caption": CAPTION.format(i)} for i in range(len(images))
                ],
            }
            annotations.write_text(json.dumps(listing))
        return [f"data.train.path={annotations}", f"data.train.root={images[0].parent}"]
    raise ValueError(f"unknown source {source!r}")


def build_datamodule(source: str, method: str, image_size: int, overrides: Sequence[str]) -> ClipDataModule:
    """The training datamodule of `source` and `method`, its teacher crop on exactly when the method's
    model reads it (as `ClipDataModule.setup` sets it from the model in training)."""
    cfg = compose(
        "train", [f"data={source}", f"method={method}", f"model.vision.image_size={image_size}", *overrides]
    )
    datamodule = instantiate(cfg.data, num_workers=0)
    masking = build_policy(dict(cfg.masking))
    datamodule.view_transform.teacher_crop = (
        masking.needs_scores or cfg.model.self_supervision.byol_weight > 0
    )
    return datamodule


@dataclass
class Pipeline:
    """One way of turning samples into collated batches, timed in rounds."""

    name: str
    batches: Callable[[int], int]  # (round) -> samples it processed
    rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def map_style(datamodule: ClipDataModule, samples: int, batch_size: int) -> Callable[[int], int]:
    """Rounds over a map-style source: `samples` per round, collated in batches, the next ones each round."""
    dataset = ImageTextDataset(datamodule.train_source, datamodule.prepare_pair)

    def run(round_index: int) -> int:
        start = round_index * samples
        for first in range(start, start + samples, batch_size):
            default_collate([dataset[i % len(dataset)] for i in range(first, first + batch_size)])
        return samples

    return run


def streaming(datamodule: ClipDataModule, samples: int, batch_size: int) -> Callable[[int], int]:
    """Rounds over a streaming source: `samples` per round from its batches, restarted when it ends."""
    stream = datamodule.train_source.batches(datamodule.prepare_pair, batch_size, 0, 1, 0)
    iterator = iter(stream)

    def run(round_index: int) -> int:
        nonlocal iterator
        done = 0
        while done < samples:
            try:
                done += len(next(iterator)["text"])
            except StopIteration:
                iterator = iter(stream)
        return done

    return run


def image_stages(
    datamodule: ClipDataModule, images: Sequence[Path], samples: int
) -> dict[str, Callable[[int], int]]:
    """The image stages of a JPEG pipeline alone, as rounds of `samples` files: `images`, the method's
    transform on the opened file as the pipeline runs it (decoding, at a reduced size where the crops
    allow, then the views and the teacher crop), which bounds the pipeline's rate before the Python
    around it (tokenisation, collation); and `views`, the same transform on pixels decoded beforehand at
    full size."""
    decoded = [decode_pixels(open_image(path)) for path in images[:samples]]

    def transformed(round_index: int) -> int:
        start = round_index * samples
        for index in range(start, start + samples):
            datamodule.view_transform(open_image(images[index % len(images)]))
        return samples

    def views(round_index: int) -> int:
        for pixels in decoded:
            datamodule.view_transform(pixels)
        return samples

    return {"images": transformed, "views": views}


def open_clip_reference(
    images: list[Path], image_size: int, samples: int, batch_size: int
) -> Callable[[int], int]:
    """open_clip's training pipeline on the same files: open, its train transform, tokenize, collate."""
    transform = open_clip.image_transform(image_size, is_train=True)

    def run(round_index: int) -> int:
        start = round_index * samples
        for first in range(start, start + samples, batch_size):
            indices = [i % len(images) for i in range(first, first + batch_size)]
            pixels = [transform(Image.open(images[i])) for i in indices]
            default_collate(
                list(zip(pixels, open_clip.tokenize([CAPTION.format(i) for i in indices]), strict=True))
            )
        return samples

    return run


def run_interleaved(pipelines: Sequence[Pipeline], rounds: int, clock: str = "wall") -> None:
    """Each round, every pipeline in turn (rotated order): its rate in samples per second of `clock`
    (a key of `CLOCKS`)."""
    now = CLOCKS[clock]
    for round_index in range(rounds):
        shift = round_index % len(pipelines)
        for pipeline in [*pipelines[shift:], *pipelines[:shift]]:
            started = now()
            done = pipeline.batches(round_index + 1)  # round 0 is the warm-up, below
            pipeline.rates.append(done / (now() - started))


def profile(pipeline: Pipeline, rounds: int = 1, top: int = 12) -> str:
    """Where one pipeline's time goes: the functions with the most time of their own, as a table."""
    profiler = cProfile.Profile()
    profiler.enable()
    for round_index in range(rounds):
        pipeline.batches(100 + round_index)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[2] for entry in stats.stats.values())
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [f"cProfile of `{pipeline.name}`, the functions with the most time of their own:", "",
             "| function | share of the time |", "| --- | ---: |"]  # fmt: skip
    for (file, line, name), entry in rows:
        where = f"{Path(file).name}:{line} {name}" if line else name
        lines.append(f"| `{where}` | {100 * entry[2] / total:.1f} % |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512, help="JPEGs in the fixture")
    parser.add_argument("--samples", type=int, default=96, help="samples per pipeline and round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up round")
    parser.add_argument("--profile", default="csv:aclip", help="SOURCE:METHOD to profile ('none': skip)")
    add_clock_argument(parser)
    parser.add_argument("--fixture", type=Path, default=Path("logs/benchmarks/loader_fixture"))
    parser.add_argument("--quick", action="store_true", help="32 px, 16 images, a few samples")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    args.threads = 1  # torch's threads in a dataloader worker
    if args.quick:
        args.image_size, args.images, args.samples, args.batch_size, args.rounds = 32, 16, 8, 4, 1
    if args.samples % args.batch_size:
        parser.error("--samples must be a multiple of --batch-size")
    return args


def measure(args: argparse.Namespace) -> tuple[list[Pipeline], str]:
    images = write_fixture(args.fixture / f"jpeg{args.images}", args.images)
    pipelines = [
        Pipeline(REFERENCE, open_clip_reference(images, args.image_size, args.samples, args.batch_size))
    ]
    for source in args.sources:
        overrides = source_overrides(source, images, args.fixture / f"jpeg{args.images}")
        for method in args.methods:
            datamodule = build_datamodule(source, method, args.image_size, overrides)
            make = streaming if source == "webdataset" else map_style
            pipelines.append(Pipeline(f"{source}:{method}", make(datamodule, args.samples, args.batch_size)))
            if source == "csv":
                for stage, run in image_stages(datamodule, images, args.samples).items():
                    pipelines.append(Pipeline(f"{source}:{method}:{stage}", run))
    for pipeline in pipelines:  # warm-up round: caches, lazy imports, first-touch allocations
        pipeline.batches(0)
    run_interleaved(pipelines, args.rounds, args.clock)
    profiled = next((p for p in pipelines if p.name == args.profile), None)
    return pipelines, (profile(profiled) if profiled else "")


def format_table(pipelines: Sequence[Pipeline]) -> str:
    reference = next(p for p in pipelines if p.name == REFERENCE).rate
    lines = [
        "| source | method | views + teacher crop | samples / s per worker, median (min-max) "
        "| ratio to open_clip |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    described = {
        "clip": "1 view",
        "aclip": "2 views + crop at the view size",
        "aclip_eff": "2 views + crop at half",
    }
    for pipeline in pipelines:
        if pipeline.name.count(":") > 1:  # a stage of a pipeline (format_stages)
            continue
        source, _, method = pipeline.name.partition(":")
        views = described.get(method, "1 view (float, normalised)")
        lines.append(
            f"| `{source}` | {f'`{method}`' if method else '`image_transform(is_train=True)`'} | {views} "
            f"| {pipeline.rate:.0f} ({min(pipeline.rates):.0f}-{max(pipeline.rates):.0f}) "
            f"| {pipeline.rate / reference:.2f} |"
        )
    return "\n".join(lines)


def format_stages(pipelines: Sequence[Pipeline]) -> str:
    """The image stages of the pipelines that have them (`<pipeline>:images`, `:views`), against the
    whole pipeline, in ms per sample."""
    rates = {pipeline.name: pipeline.rate for pipeline in pipelines}
    timed = [name for name in rates if f"{name}:images" in rates]
    if not timed:
        return ""
    lines = [
        "The image stages alone, timed in the same rounds (ms per sample): the transform on the opened",
        "file (decoding and the views, as the pipeline runs it) bounds the rate before the Python around",
        "it (tokenisation, collation); the views alone are the transform on pixels decoded beforehand.",
        "",
        "| pipeline | whole | decode + views | views alone | the rest | rate bound by decode + views |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in timed:
        whole, image, views = (1e3 / rates[key] for key in (name, f"{name}:images", f"{name}:views"))
        lines.append(
            f"| `{name}` | {whole:.2f} | {image:.2f} | {views:.2f} | {whole - image:.2f} "
            f"| {1e3 / image:.0f} samples/s |"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace, command: str, pipelines: Sequence[Pipeline], profiled: str) -> str:
    lines = [
        *report_head(
            "loader",
            command,
            f"{device_name(torch.device('cpu'))}, one process (one dataloader worker's work)",
        ),
        f"- {args.image_size} px views; a fixture of {args.images} JPEGs (500 x 375, quality 90); "
        f"{args.rounds} rounds of {args.samples} samples per pipeline in batches of {args.batch_size}, "
        f"after a warm-up round; decoding, views, tokenisation and collation included; {args.clock} clock",
        "",
        format_table(pipelines),
    ]
    stages = format_stages(pipelines)
    if stages:
        lines += ["", stages]
    if profiled:
        lines += ["", profiled]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    return run_benchmark(
        "loader", argv, parse_args, lambda args, command: report(args, command, *measure(args))
    )


if __name__ == "__main__":
    main()
