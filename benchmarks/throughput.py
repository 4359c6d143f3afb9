"""Training throughput on one device: images per second and model FLOPs utilisation (MFU).

Three figures per variant:
- model alone: the real module and Lightning loop on one fixed batch already on the device (drawn from
  the real datamodule), so that nothing but the model is measured; FLOPs of a step are counted by
  torch's FLOP counter (`torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions and attention,
  forward, backward and the EMA pass) and MFU is their rate over the device's peak;
- loader alone: how many training samples per second the real dataloader (built-in dataset,
  `--loader-workers` processes) produces with no model;
- model with loader: the same training steps fed by that dataloader, which shows whether data loading
  keeps up.

Images per second count training samples (each holds `data.num_views` views and the teacher's crop).

    python -m benchmarks.throughput                                 # ViT-B/16 aclip_eff, bf16, on CUDA
    python -m benchmarks.throughput --variants clip aclip aclip_eff --batch-size 256 --loader-workers 14
    python -m benchmarks.throughput --quick --device cpu            # the tiny model, printed only
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from benchmarks.flops import flop_counter
from benchmarks.reporting import (
    add_common_arguments,
    check_compile_warmup,
    device_name,
    memory_text,
    report_head,
    resolve_device,
    run_benchmark,
)
from benchmarks.timing import RunSettings, StepTimer, fit, quiet_lightning, time_steps
from benchmarks.variants import PRECISIONS, VARIANTS, Variant, build_variant, datamodule

# Dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s, by a substring of the device name, most
# specific first. Pass --peak-tflops for any other device or precision.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
)


def forward_backward_flops(function: Callable[[], Tensor]) -> int:
    """FLOPs of `function()` plus the backward pass of its sum, by torch's FLOP counter."""
    with flop_counter() as counter:
        function().float().sum().backward()
    return counter.get_total_flops()


def vision_flops(tower: nn.Module, images: Tensor, keep: Tensor | None = None) -> int:
    """Training FLOPs (forward and backward) of a vision tower on `images` seeing only `keep` patches."""
    return forward_backward_flops(lambda: tower(images, keep))


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> float | None:
    """The device's dense peak for `dtype` in TFLOP/s: `override`, else the table for bf16/fp16 GPUs."""
    if override is not None:
        return override
    if device.type != "cuda" or dtype not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@dataclass
class Throughput:
    """Measured images per second of one variant (None where not measured) and its step FLOPs."""

    name: str
    batch_size: int
    model_alone: float
    flops: int | None
    loader_alone: float | None = None
    with_loader: float | None = None
    peak_memory: int = 0


def _rate(batch_size: int, times: Sequence[float]) -> float:
    """Samples per second over the timed steps (total, not median: sustained throughput)."""
    if not times:
        raise RuntimeError("no step was timed: the epoch is shorter than the warm-up and timed steps")
    return batch_size * len(times) / sum(times)


def loader_rate(variant: Variant, workers: int, batches: int) -> float:
    """Samples per second the real dataloader yields, after its first batch (workers started)."""
    loader = datamodule(variant.cfg, num_workers=workers).train_dataloader()
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - started
    del iterator  # stops the workers
    return batches * loader.batch_size / seconds


def with_loader_rate(variant: Variant, workers: int, settings: RunSettings) -> float:
    """Samples per second of training steps fed by the real dataloader with `workers` processes."""
    timer = StepTimer(settings.warmup)
    fit(variant.module, variant.cfg, datamodule(variant.cfg, num_workers=workers), settings, [timer])
    return _rate(variant.cfg.data.batch_size, timer.times)


def measure(args: argparse.Namespace) -> list[Throughput]:
    """Every figure of every variant in `args.variants`."""
    quiet_lightning()
    settings = RunSettings(args.device, PRECISIONS[args.dtype], args.steps, args.warmup)
    results = []
    for name in args.variants:
        variant = build_variant(name, args.model, args.batch_size, args.overrides)
        time_steps(variant, settings)
        result = Throughput(name, args.batch_size, _rate(args.batch_size, variant.times), variant.flops)
        result.peak_memory = variant.peak_memory
        if args.loader_workers:
            result.loader_alone = loader_rate(variant, args.loader_workers, args.loader_batches)
            loader_settings = replace(settings, warmup=args.loader_warmup)
            result.with_loader = with_loader_rate(variant, args.loader_workers, loader_settings)
        results.append(result)
    return results


def _optional(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(results: Sequence[Throughput], peak: float | None, device: torch.device) -> str:
    """Markdown: images/s alone and with the loader, TFLOP/s, MFU and memory per variant."""
    lines = [
        "| variant | images/s, model alone | GFLOP / image | TFLOP/s | MFU | images/s, loader alone "
        "| images/s, model with loader | peak memory |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        per_image = r.flops / r.batch_size / 1e9 if r.flops else None
        achieved = r.flops / r.batch_size * r.model_alone / 1e12 if r.flops else None
        mfu = 100 * achieved / peak if achieved and peak else None
        memory = memory_text(r.peak_memory, device)
        lines.append(
            f"| `{r.name}` | {r.model_alone:.1f} | {_optional(per_image, '.1f')} | "
            f"{_optional(achieved, '.3g')} | {_optional(mfu, '.1f')}{' %' * (mfu is not None)} | "
            f"{_optional(r.loader_alone, '.1f')} | {_optional(r.with_loader, '.1f')} | {memory} |"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace, command: str, results: Sequence[Throughput]) -> str:
    """The markdown section: command, device, settings and the table."""
    peak = peak_tflops(args.device, args.dtype, args.peak_tflops)
    peak_text = f"peak {peak:g} TFLOP/s dense {args.dtype}" if peak else "no peak known: MFU n/a"
    loader = (
        f"; loader: built-in dataset, {args.loader_workers} workers, {args.loader_batches} batches timed "
        f"alone, {args.loader_warmup} warm-up steps before the run with the model"
        if args.loader_workers
        else "; loader not measured"
    )
    return "\n".join(
        [
            *report_head("throughput", command, f"{device_name(args.device)} ({peak_text})"),
            f"- model `{args.model}`, per-device batch {args.batch_size}, {args.dtype} "
            f"(Lightning precision `{PRECISIONS[args.dtype]}`); {args.steps} timed steps after "
            f"{args.warmup} warm-up steps{loader}",
            "",
            format_table(results, peak, args.device),
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_b16", help="a conf/model name")
    parser.add_argument("--batch-size", type=int, default=256, help="per-device batch")
    parser.add_argument("--dtype", choices=sorted(PRECISIONS), default="bf16", help="training precision")
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=["aclip_eff"], help="variants to measure"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (>= 1)")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 2),
        help="dataloader processes for the loader figures (0: skip them)",
    )
    parser.add_argument("--loader-batches", type=int, default=20, help="batches timed for the loader alone")
    parser.add_argument(
        "--loader-warmup",
        type=int,
        default=10,
        help="untimed steps of the run with the loader (workers start)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for --dtype, for MFU")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 8, a few steps: a smoke test")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.steps, args.warmup = "tiny", 8, 2, 1
        args.loader_workers, args.loader_batches, args.loader_warmup = min(args.loader_workers, 1), 2, 1
    check_compile_warmup(parser, args.overrides, min(args.warmup, args.loader_warmup))
    if args.warmup < 1 or args.steps < 1 or args.loader_warmup < 1 or args.loader_workers < 0:
        parser.error("--warmup, --steps and --loader-warmup must be >= 1, --loader-workers >= 0")
    args.device = resolve_device(args.device)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print the report and append it to the output file (see `output_file`)."""
    return run_benchmark(
        "throughput", argv, parse_args, lambda args, command: report(args, command, measure(args))
    )


if __name__ == "__main__":
    main()
