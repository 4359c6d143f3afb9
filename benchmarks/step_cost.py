"""Training-step cost of the token-reduction variants against plain CLIP, interleaved in one process.

Every variant (`variants.VARIANTS`: clip, random_1x50, attentive_2x50, aclip, aclip_eff, resize) is the
real `AClip` module of its method preset, trained by a real Lightning `Trainer` with the EMA callback
on one fixed batch from the real datamodule, already on the device. The variants take turns, round
after round in rotated order, so that drift of the machine falls on all of them alike. The report holds
the median step time, its ratio to `clip`, the step's FLOPs (torch's FLOP counter) and their ratio to
`clip` (the cost floor the design sets), peak device memory, and a phase breakdown of chosen variants
(`benchmarks.breakdown`). It is printed and appended to BENCHMARKS.md with the command and device.

    python -m benchmarks.step_cost                  # ViT-B/16 bf16 on a GPU; ViT-S/16 batch 4 on a CPU
    python -m benchmarks.step_cost --threads 1 --clock cpu   # a CPU shared with other jobs (~5 min, 2 cores)
    python -m benchmarks.step_cost --quick          # the tiny model, one step each, printed only
    python -m benchmarks.step_cost --device cuda --model vit_b16 --batch-size 256 --dtype bf16
    python -m benchmarks.step_cost --against open_clip --variants clip random_1x50 aclip_eff --breakdown

`--against open_clip` adds open_clip's own `CLIP` + `ClipLoss` step on towers of the same sizes (this
project's with ViT's patch projection, `model.vision.stem=patch`, the tiny model's convolutional stem aside)
(`benchmarks.open_clip_reference`) to the rotation, and a table pairing `clip` and `aclip_eff` with it and
`random_1x50` with open_clip's `patch_dropout=0.5`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from benchmarks.breakdown import Breakdown, format_breakdown, profile_variant
from benchmarks.open_clip_reference import PAIRS, build_reference, reference_name, trainable_parameters
from benchmarks.prediction import format_tables, measured, predict
from benchmarks.reporting import (
    add_common_arguments,
    check_compile_warmup,
    device_name,
    memory_text,
    report_head,
    resolve_device,
    run_benchmark,
)
from benchmarks.throughput import peak_tflops
from benchmarks.timing import RunSettings, add_clock_argument, quiet_lightning, run_interleaved
from benchmarks.variants import PRECISIONS, VARIANTS, Variant, build_variant

BASELINE = "clip"
CLOCK_TEXT = {"wall": "the wall clock (device synchronised)", "cpu": "this process's CPU time"}


@dataclass(frozen=True)
class Defaults:
    """Per-device defaults: a GPU runs the paper's model; a small CPU finishes in minutes."""

    model: str
    batch_size: int
    dtype: str
    steps: int
    warmup: int
    rounds: int


DEFAULTS = {
    "cuda": Defaults("vit_b16", 256, "bf16", steps=10, warmup=3, rounds=3),
    "cpu": Defaults("vit_s16", 4, "fp32", steps=2, warmup=1, rounds=2),
    "quick": Defaults("tiny", 8, "fp32", steps=1, warmup=1, rounds=1),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a conf/model name (default: vit_b16 on CUDA, vit_s16 on the CPU)")
    parser.add_argument(
        "--batch-size", type=int, help="per-device batch (default: 256 on CUDA, 4 on the CPU)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(PRECISIONS), help="training precision (default: bf16 on CUDA)"
    )
    parser.add_argument("--steps", type=int, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, help="untimed steps before them, in every round (>= 1)")
    parser.add_argument("--rounds", type=int, help="rounds over all variants, each in a rotated order")
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="variants to time"
    )
    parser.add_argument(
        "--breakdown",
        nargs="*",
        choices=[*sorted(VARIANTS), "none"],
        default=["aclip", "aclip_eff"],
        help="variants whose step is split into phases with the profiler (no name: every timed variant; "
        "none: skip)",
    )
    add_clock_argument(parser, wall="wall time, device synchronised")
    parser.add_argument(
        "--against",
        choices=["open_clip"],
        help="also time open_clip's CLIP + ClipLoss on the same towers and pair it with clip, random_1x50 "
        "(patch_dropout 0.5) and aclip_eff",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 8, one step per variant")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    defaults = DEFAULTS["quick" if args.quick else device.type]
    for name in ("model", "batch_size", "dtype", "steps", "warmup", "rounds"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    if BASELINE not in args.variants:
        parser.error(f"--variants must include the baseline {BASELINE!r}")
    if "none" in args.breakdown:
        if len(args.breakdown) > 1:
            parser.error("--breakdown none names no other variant")
        args.breakdown = []
    elif not args.breakdown:
        args.breakdown = list(args.variants)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    check_compile_warmup(parser, args.overrides, args.warmup)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu times CPU work only: use it with --device cpu")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    args.device = device
    return args


def format_table(variants: Sequence[Variant], device: torch.device) -> str:
    """Markdown: per variant, ms/step (median, range) and its ratio to clip, GFLOP/step and ratio, memory."""
    base = next(v for v in variants if v.name == BASELINE)
    lines = [
        "| variant | method preset | views x kept patches | ms / step, median (min-max) | ratio to clip "
        "| GFLOP / step | FLOP ratio to clip | peak memory |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in variants:
        preset = f"`{VARIANTS[variant.name]}`" if variant.ema else "open_clip `CLIP` + `ClipLoss`"
        flops = f"{variant.flops / 1e9:.1f}" if variant.flops else "n/a"
        flop_ratio = f"{variant.flops / base.flops:.2f}" if variant.flops and base.flops else "n/a"
        memory = memory_text(variant.peak_memory, device)
        lines.append(
            f"| `{variant.name}` | {preset} | {_views(variant)} "
            f"| {variant.milliseconds()} "
            f"| {variant.median / base.median:.2f} | {flops} | {flop_ratio} | {memory} |"
        )
    return "\n".join(lines)


def _views(variant: Variant) -> str:
    """`k x kept/total` patches of the online views, e.g. `2 x 98/196`."""
    if not variant.ema:  # open_clip's reference: one view, patch_dropout keeps int(total * (1 - p))
        vision = variant.module.model.visual
        total = vision.grid_size[0] * vision.grid_size[1]
        dropout = getattr(vision.patch_dropout, "prob", 0.0)
        return f"1 x {max(1, int(total * (1 - dropout)))}/{total}"
    masking, vision, images = variant.module.masking, variant.module.model.vision, variant.batch["images"]
    grid = vision.grid(masking.view_size(images.shape[-1], vision.patch_size))
    total = grid[0] * grid[1]
    return f"{images.shape[1]} x {masking.num_keep(grid)}/{total}"


def format_pairs(variants: Sequence[Variant]) -> str:
    """Markdown: each aclip variant against its open_clip reference, step time and trainable parameters."""
    by_name = {variant.name: variant for variant in variants}
    lines = [
        "| aclip variant | open_clip reference | aclip ms / step | open_clip ms / step | ratio "
        "| trainable parameters, aclip / open_clip |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, dropout in PAIRS.items():
        if name not in by_name or reference_name(dropout) not in by_name:
            continue
        ours, theirs = by_name[name], by_name[reference_name(dropout)]
        ours_params, their_params = trainable_parameters(ours.module), trainable_parameters(theirs.module)
        lines.append(
            f"| `{name}` | `{theirs.name}` (patch_dropout {dropout}) | {ours.median * 1e3:.1f} "
            f"| {theirs.median * 1e3:.1f} | {ours.median / theirs.median:.2f} "
            f"| {ours_params:,} / {their_params:,} ({ours_params / their_params - 1:+.4%}) |"
        )
    return "\n".join(lines)


def _breakdown_summary(name: str, breakdown: Breakdown) -> str:
    return f"Phase breakdown of `{name}` (one profiled step after warm-up):\n\n{format_breakdown(breakdown)}"


def report(
    args: argparse.Namespace, command: str, variants: Sequence[Variant], breakdowns: dict[str, Breakdown]
) -> str:
    """The markdown section: command, device, settings, the table and the breakdowns."""
    load = ""
    if args.device.type == "cpu" and hasattr(os, "getloadavg"):
        load = f", 1-minute load average at the end {os.getloadavg()[0]:.1f}"
    lines = [
        *report_head("step_cost", command, f"{device_name(args.device)}{load}"),
        f"- model `{args.model}`, per-device batch {args.batch_size}, {args.dtype} "
        f"(Lightning precision `{PRECISIONS[args.dtype]}`); {args.rounds} rounds x {args.steps} timed "
        f"steps per variant after {args.warmup} warm-up step(s) each round; step times by "
        f"{CLOCK_TEXT[args.clock]}",
        "",
        format_table(variants, args.device),
    ]
    if args.against:
        lines += ["", "Against open_clip, same towers, same batch, interleaved:", "", format_pairs(variants)]
    if args.device.type == "cuda":
        lines += [
            "",
            "Predicted (`benchmarks.prediction`) against measured here:",
            "",
            measured_tables(args, variants),
        ]
    lines += ["", *(_breakdown_summary(name, b) + "\n" for name, b in breakdowns.items())]
    return "\n".join(lines).rstrip() + "\n"


def measured_tables(args: argparse.Namespace, variants: Sequence[Variant]) -> str:
    """`benchmarks.prediction`'s tables for this project's variants, the measured columns from this run
    (the predictions from the FLOPs counted here on the real step, at this batch)."""
    peak = peak_tflops(args.device, args.dtype, None)
    rows = [
        replace(
            predict(v, v.flops / args.batch_size, args.batch_size),
            measured=measured(v, args.batch_size, peak),
        )
        for v in variants
        if v.ema and v.flops
    ]
    return format_tables(rows, args.batch_size)


def references(variants: Sequence[Variant]) -> list[Variant]:
    """open_clip's reference steps for the paired variants among `variants`, on `clip`'s one-view batch."""
    base = next(v for v in variants if v.name == BASELINE)
    dropouts = sorted({PAIRS[v.name] for v in variants if v.name in PAIRS})
    return [
        Variant(reference_name(p), base.cfg, build_reference(base.module, p), base.batch, ema=False)
        for p in dropouts
    ]


def measure(args: argparse.Namespace) -> tuple[list[Variant], dict[str, Breakdown]]:
    """Build the variants, time them interleaved, then profile the breakdown variants."""
    quiet_lightning()
    settings = RunSettings(args.device, PRECISIONS[args.dtype], args.steps, args.warmup, args.clock)
    # open_clip's ViT embeds patches with one linear projection: against it, so do this project's towers.
    overrides = [*args.overrides, *(["model.vision.stem=patch"] if args.against else [])]
    variants = [build_variant(name, args.model, args.batch_size, overrides) for name in args.variants]
    if args.against:
        variants += references(variants)
    run_interleaved(variants, args.rounds, settings)
    by_name = {variant.name: variant for variant in variants}
    breakdowns = {
        name: profile_variant(by_name[name], replace(settings, steps=1))
        for name in args.breakdown
        if name in by_name
    }
    return variants, breakdowns


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print the report and append it to the output file (see `output_file`)."""
    return run_benchmark(
        "step_cost", argv, parse_args, lambda args, command: report(args, command, *measure(args))
    )


if __name__ == "__main__":
    main()
