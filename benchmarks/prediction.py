"""Predicted training throughput and memory of each method for ViT-B/16 at 224 px on one H100 (80 GB),
beside the same figures measured: `python -m benchmarks.step_cost --device cuda` (a part of
`benchmarks/gpu.sh`) prints these tables with the measured columns filled.

Every predicted figure comes from counts and published anchors (/work/shared/ANCHORS.md), none from a GPU:
- FLOPs per image: torch's FLOP counter over one real training step of the method's module (forward,
  backward, the EMA teacher's pass), run on fake tensors (`FakeTensorMode`: shapes, no memory), so that
  ViT-B/16 costs a CPU seconds of bookkeeping, not minutes of arithmetic.
- Images/s and MFU: the H100's dense bf16 peak, 989 TFLOP/s, at the model FLOPs utilisation of published
  CLIP training: 21 % (NVIDIA NeMo's CLIP g/14 on H100), within 13 % (open_clip's LAION-400M B/16 on A100
  with 2022 code, about 335 images/s) and 39 % (NeMo's g/14 on A100). Every method is assumed to reach
  the same MFU, so its images/s is that share of the peak over its FLOPs per image.
- Dataloader workers per GPU: those images/s over what one worker delivers for the method's pipeline,
  measured on this project's 2-core CPU (`WORKER_RATES`).
- Memory: `benchmarks.memory`'s model (activations per sample over the kept tokens, bytes per parameter):
  the peak at the benchmark's batch and the largest batch in 80 GB. Beside the model, what torch itself
  saves for the backward pass of the fake step in bf16 autocast, per sample (the slope between two batch
  sizes), which checks the model at full size.

    python -m benchmarks.prediction                  # ViT-B/16 at 224 px, the benchmark variants
    python -m benchmarks.prediction --quick          # the tiny model, printed only
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.flops import flop_counter
from benchmarks.memory import (
    HEADROOM,
    SavedTensors,
    Tower,
    largest_batch,
    peak_bytes,
    sample_activation_bytes,
    static_bytes,
)
from benchmarks.reporting import add_output_arguments, device_name, report_head, run_benchmark
from benchmarks.variants import VARIANTS, Batch, Variant, attach_barebones_trainer, build_variant

H100_PEAK_TFLOPS = 989.4  # dense bf16, SXM
CAPACITY = 80e9  # bytes: an 80 GB H100
# Model FLOPs utilisation of published CLIP training: the prediction's point and range.
MFU = 0.21  # NVIDIA NeMo, CLIP g/14 on H100
MFU_RANGE = (0.13, 0.39)  # open_clip's LAION-400M B/16 on A100 (2022); NeMo's g/14 on A100
# Samples/s one dataloader worker delivers (decode, views, teacher crop, tokens, collation), csv source,
# on this project's 2-core AMD EPYC: BENCHMARKS.md, run log "loader, 2026-12-02"
# (`python -m benchmarks.loader --clock cpu --rounds 5`).
WORKER_RATES = {
    "one view": 451.0,
    "two views, teacher crop": 299.0,
    "two views, half-size teacher crop": 310.0,
}


def pipeline(variant: Variant) -> str:
    """The loader pipeline of `variant`'s method, a key of `WORKER_RATES` (two views without a teacher
    crop are priced as two views with one: an upper bound on the workers)."""
    data, module = variant.cfg.data, variant.module
    if data.num_views == 1 and not module.needs_teacher_crop:
        return "one view"
    if module.needs_teacher_crop and data.ema_image_size < data.image_size:
        return "two views, half-size teacher crop"
    return "two views, teacher crop"


@dataclass(frozen=True)
class Figures:
    """One method's throughput and memory on one GPU, predicted or measured."""

    images_per_second: float
    mfu: float
    workers: int
    peak_memory: float  # bytes, at the benchmark's batch
    largest_batch: int  # in `CAPACITY`


@dataclass(frozen=True)
class Row:
    """A method's counts, predictions and (from a GPU) measurements."""

    name: str
    views: str  # k x kept / total patches
    gflop_per_image: float
    predicted: Figures
    images_per_second_range: tuple[float, float]
    activation_bytes: float  # per sample, the memory model
    counted_activation_bytes: float | None  # per sample, saved by torch in the fake step
    static_bytes: float
    measured: Figures | None = None


def towers(variant: Variant) -> tuple[Tower, Tower]:
    """The shapes of the variant's vision and text towers."""
    trunk = variant.module.model.vision.trunk
    block = trunk.blocks[0]
    vision = Tower(
        trunk.embed_dim, len(trunk.blocks), block.attn.num_heads, block.mlp.fc1.out_features / trunk.embed_dim
    )
    text = variant.module.model.text.transformer
    resblock = text.transformer.resblocks[0]
    ratio = resblock.mlp.c_fc.out_features / text.width
    return vision, Tower(text.width, len(text.transformer.resblocks), resblock.attn.num_heads, ratio)


def view_geometry(variant: Variant) -> tuple[int, int, int, int]:
    """(views, kept patches per view, patches per view, the view's side in px) of the variant."""
    module, images = variant.module, variant.batch["images"]
    side = module.masking.view_size(images.shape[-1], module.model.vision.patch_size)
    grid = module.model.vision.grid(side)
    return images.shape[1], module.masking.num_keep(grid), grid[0] * grid[1], side


def memory_model(variant: Variant) -> tuple[float, float]:
    """(activation bytes per sample, static bytes) of the variant by `benchmarks.memory`."""
    module = variant.module
    views, kept, patches, side = view_geometry(variant)
    vision, text = towers(variant)
    text_tokens = variant.batch["text"].shape[1]
    per_sample = sample_activation_bytes(views, kept, patches, side, vision, text_tokens, text)
    teacher = {id(p): p for ema_module, _ in module.ema_pairs() for p in ema_module.parameters()}
    online = [p for p in module.parameters() if id(p) not in teacher]
    trainable = sum(p.numel() for p in online if p.requires_grad)
    frozen = sum(p.numel() for p in online if not p.requires_grad)
    return per_sample, static_bytes(trainable, frozen, sum(p.numel() for p in teacher.values()))


def predict(variant: Variant, flops_per_image: float, batch_size: int, counted: float | None = None) -> Row:
    """The predicted row of `variant` from its FLOPs per image (and the counted activations, if any)."""
    per_sample, static = memory_model(variant)
    rate = MFU * H100_PEAK_TFLOPS * 1e12 / flops_per_image
    low, high = (mfu * H100_PEAK_TFLOPS * 1e12 / flops_per_image for mfu in MFU_RANGE)
    views, kept, total, _ = view_geometry(variant)
    predicted = Figures(
        images_per_second=rate,
        mfu=MFU,
        workers=math.ceil(rate / WORKER_RATES[pipeline(variant)]),
        peak_memory=peak_bytes(batch_size, per_sample, static),
        largest_batch=largest_batch(CAPACITY, per_sample, static),
    )
    return Row(
        variant.name,
        f"{views} x {kept}/{total}",
        flops_per_image / 1e9,
        predicted,
        (low, high),
        per_sample,
        counted,
        static,
    )


def measured(variant: Variant, batch_size: int, peak_tflops: float | None) -> Figures:
    """What a CUDA run of `variant` (`benchmarks.timing.time_steps`) measured, as `Figures`: its memory
    extrapolated to `CAPACITY` from the peak and the static memory at `batch_size`."""
    rate = batch_size / variant.median
    mfu = variant.flops / variant.median / (peak_tflops * 1e12) if variant.flops and peak_tflops else math.nan
    per_sample = (variant.peak_memory - variant.static_memory) / batch_size
    return Figures(
        images_per_second=rate,
        mfu=mfu,
        workers=math.ceil(rate / WORKER_RATES[pipeline(variant)]),
        peak_memory=variant.peak_memory,
        largest_batch=largest_batch(CAPACITY, per_sample, variant.static_memory),
    )


def count_on_fake_tensors(variant: Variant, batch_sizes: tuple[int, int] = (4, 8)) -> tuple[float, float]:
    """(FLOPs per image, activation bytes per sample) of one training step of `variant` in bf16 autocast
    on fake tensors of its batch's shapes: the FLOPs at the larger batch, the activations as the slope of
    the bytes saved for the backward pass between the two batch sizes."""
    module = variant.module
    attach_barebones_trainer(module)
    flops, saved = [], []
    with FakeTensorMode(allow_non_fake_inputs=True):
        for batch_size in batch_sizes:
            saving = SavedTensors()
            with flop_counter() as counter:
                with saving, MixedPrecision("bf16-mixed", "cpu").forward_context():
                    loss = module.training_step(fake_batch(variant.batch, batch_size), 0)["loss"]
                loss.backward()
            module.zero_grad(set_to_none=True)
            flops.append(counter.get_total_flops() / batch_size)
            saved.append(saving.nbytes)
    module.trainer = None
    return flops[-1], (saved[1] - saved[0]) / (batch_sizes[1] - batch_sizes[0])


def fake_batch(batch: Batch, batch_size: int) -> Batch:
    """`batch` with every tensor replaced by an empty one of `batch_size` rows (inside `FakeTensorMode`)."""
    return {
        key: torch.empty((batch_size, *value.shape[1:]), dtype=value.dtype)
        if isinstance(value, torch.Tensor)
        else value
        for key, value in batch.items()
    }


def _gb(value: float) -> str:
    return f"{value / 1e9:.1f} GB"


def format_tables(rows: Sequence[Row], batch_size: int) -> str:
    """Markdown: throughput and memory, each predicted figure beside its measured one (empty until a GPU
    run fills it)."""
    low, high = (f"{100 * mfu:.0f} %" for mfu in MFU_RANGE)
    throughput = [
        f"| method | views x kept patches | GFLOP / image | images/s, predicted at {100 * MFU:.0f} % MFU "
        f"({low}-{high}) | images/s, measured | MFU, predicted | MFU, measured | loader workers / GPU, "
        "predicted | loader workers / GPU, measured |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    memory = [
        "| method | activations / sample, model (torch's count) | static | peak at batch "
        f"{batch_size}, predicted | peak at batch {batch_size}, measured | largest batch in 80 GB, predicted "
        "| largest batch in 80 GB, measured |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        p, m = row.predicted, row.measured
        low_rate, high_rate = row.images_per_second_range
        measured_rate, measured_mfu, measured_workers, measured_peak, measured_batch = (
            (
                f"{m.images_per_second:.0f}",
                f"{100 * m.mfu:.1f} %",
                m.workers,
                _gb(m.peak_memory),
                m.largest_batch,
            )
            if m
            else ("",) * 5
        )
        throughput.append(
            f"| `{row.name}` | {row.views} | {row.gflop_per_image:.1f} | {p.images_per_second:.0f} "
            f"({low_rate:.0f}-{high_rate:.0f}) | {measured_rate} | {100 * p.mfu:.0f} % | {measured_mfu} "
            f"| {p.workers} | {measured_workers} |"
        )
        counted = f" ({row.counted_activation_bytes / 1e6:.1f} MB)" if row.counted_activation_bytes else ""
        memory.append(
            f"| `{row.name}` | {row.activation_bytes / 1e6:.1f} MB{counted} | {_gb(row.static_bytes)} "
            f"| {_gb(p.peak_memory)} | {measured_peak} | {p.largest_batch} | {measured_batch} |"
        )
    return "\n".join([*throughput, "", *memory])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_b16", help="a conf/model name")
    parser.add_argument("--batch-size", type=int, default=256, help="the per-GPU batch of the peak memory")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), help="benchmark variants or method presets"
    )
    parser.add_argument("--quick", action="store_true", help="the tiny model: checks that it runs")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.model = "tiny"
    return args


def rows(args: argparse.Namespace) -> list[Row]:
    """Every variant's predicted row."""
    predicted = []
    for name in args.variants:
        variant = build_variant(name, args.model, 2)
        flops, counted = count_on_fake_tensors(variant)
        predicted.append(predict(variant, flops, args.batch_size, counted))
    return predicted


def report(args: argparse.Namespace, command: str, predicted: Sequence[Row]) -> str:
    """The markdown section: command, settings and the two tables."""
    return "\n".join(
        [
            *report_head("prediction", command, f"no GPU: counted on {device_name(torch.device('cpu'))}"),
            f"- model `{args.model}`; every figure predicted for one H100 SXM 80 GB ({H100_PEAK_TFLOPS:g} "
            f"TFLOP/s dense bf16), bf16-mixed; the largest batch leaves {100 * HEADROOM:.0f} % of the "
            "memory free (`benchmarks.memory`)",
            "",
            format_tables(predicted, args.batch_size),
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> str:
    """Print the predicted tables and append them to the output file (see `output_file`)."""
    return run_benchmark(
        "prediction", argv, parse_args, lambda args, command: report(args, command, rows(args))
    )


if __name__ == "__main__":
    main()
