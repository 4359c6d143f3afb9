"""Training-step time with the online towers compiled (`torch.compile`, inductor) against eager, and what
compiling costs: graphs, graph breaks, recompilations, seconds.

Each method preset is built twice from the same seed (identical weights): eager, and with both online
towers compiled in place as `model.compile=true` does (`AClip.configure_model`; `--backend` picks the
compiler). The two take turns on the method's fixed batch, round after round (`benchmarks.timing`), so that
drift of the machine falls on both; the compiled one compiles during its first warm-up steps, which are not
timed. What torch compiled is read from its own records (`torch._dynamo.utils.get_compilation_metrics` and
`counters`), reset before each method: the graphs compiled, graph breaks, and every recompilation after the
first, with torch's reason. The report is printed and appended to BENCHMARKS.md.

    python -m benchmarks.compile_cost --threads 1 --clock cpu   # ViT-S/16, batch 4, CPU: compiles for minutes
    python -m benchmarks.compile_cost --quick --backend eager   # tiny model, dynamo alone: seconds
    python -m benchmarks.compile_cost --device cuda --model vit_b16 --batch-size 256 --dtype bf16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics

from aclip.modules.aclip import AClip
from benchmarks.reporting import add_common_arguments, device_name, report_head, resolve_device, run_benchmark
from benchmarks.timing import RunSettings, add_clock_argument, quiet_lightning, time_steps
from benchmarks.variants import PRECISIONS, Variant, build_variant, method_presets

METHODS = ("clip", "random_2x50", "aclip_eff")


@dataclass(frozen=True)
class CompileRecord:
    """What torch compiled since the records were last reset (`reset_compile_records`)."""

    graphs: int  # frames compiled the first time (one per tower without graph breaks)
    graph_breaks: int
    recompiles: tuple[str, ...]  # torch's reason for each recompilation of a frame
    seconds: float  # dynamo, AOT autograd and the backend, forward and backward


def reset_compile_records() -> None:
    """Forget compiled code and torch's records of it (the next call compiles afresh)."""
    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()


def compile_record() -> CompileRecord:
    """torch's records of what it compiled since `reset_compile_records`."""
    metrics = get_compilation_metrics()
    frames = [m for m in metrics if m.co_name is not None]  # the others: backward graphs, compiled lazily
    seconds = sum(m.entire_frame_compile_time_s or 0.0 for m in frames)
    seconds += sum((m.backward_cumulative_compile_time_us or 0) / 1e6 for m in metrics if m.co_name is None)
    return CompileRecord(
        graphs=sum(m.recompile_reason is None for m in frames),
        graph_breaks=sum(counters["graph_break"].values()),
        recompiles=tuple(m.recompile_reason for m in frames if m.recompile_reason is not None),
        seconds=seconds,
    )


def compile_towers(module: AClip, backend: str) -> None:
    """Compile the module's online towers in place, as `model.compile=true` does, with `backend`."""
    module.model.vision.compile(backend=backend)
    module.model.text.compile(backend=backend)


@dataclass
class MethodResult:
    """A method's eager and compiled runs and what compiling it took."""

    eager: Variant
    compiled: Variant
    record: CompileRecord
    first_fit_seconds: float  # the compiled run's first fit: compilation, warm-up and timed steps


def measure_method(method: str, args: argparse.Namespace, settings: RunSettings) -> MethodResult:
    """Eager and compiled runs of `method`, interleaved over `args.rounds` rounds."""
    eager = build_variant(method, args.model, args.batch_size, args.overrides)
    compiled = build_variant(method, args.model, args.batch_size, args.overrides)
    compiled.name = f"{method} compiled"
    compile_towers(compiled.module, args.backend)
    reset_compile_records()
    time_steps(eager, settings)  # also counts the step's FLOPs, which compiling does not change
    compiled.flops = eager.flops
    started = time.perf_counter()
    time_steps(compiled, settings)
    first_fit = time.perf_counter() - started
    for round_index in range(1, args.rounds):
        for variant in (compiled, eager) if round_index % 2 else (eager, compiled):
            time_steps(variant, settings)
    return MethodResult(eager, compiled, compile_record(), first_fit)


def format_table(results: Sequence[MethodResult]) -> str:
    """Markdown: per method, eager and compiled ms/step, their ratio, and what compiling took."""
    lines = [
        "| method | eager ms / step | compiled ms / step | compiled / eager | first compiled fit, s "
        "| compiling, s | graphs | graph breaks | recompilations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        eager, compiled, record = result.eager, result.compiled, result.record
        reasons = "; ".join(record.recompiles) or "none"
        lines.append(
            f"| `{eager.name}` | {eager.milliseconds()} | {compiled.milliseconds()} "
            f"| {compiled.median / eager.median:.2f} "
            f"| {result.first_fit_seconds:.0f} | {record.seconds:.0f} | {record.graphs} "
            f"| {record.graph_breaks} | {len(record.recompiles)}: {reasons} |"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace, command: str, results: Sequence[MethodResult]) -> str:
    """The markdown section: command, device, settings and the table."""
    return "\n".join(
        [
            *report_head("compile_cost", command, device_name(args.device)),
            f"- model `{args.model}`, per-device batch {args.batch_size}, {args.dtype} (Lightning precision "
            f"`{PRECISIONS[args.dtype]}`); online towers compiled with `torch.compile(backend="
            f'"{args.backend}")`; {args.rounds} rounds x {args.steps} timed steps per run after '
            f"{args.warmup} warm-up steps each round, eager and compiled alternating; {args.clock} clock",
            "",
            format_table(results),
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", nargs="+", choices=method_presets(), default=list(METHODS), help="method presets"
    )
    parser.add_argument("--model", help="a conf/model name (default: vit_b16 on CUDA, vit_s16 on the CPU)")
    parser.add_argument(
        "--batch-size", type=int, help="per-device batch (default: 256 on CUDA, 4 on the CPU)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(PRECISIONS), help="training precision (default: bf16 on CUDA)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run and round")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps before them each round (>= 3: compiling)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of eager and compiled runs (>= 1)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo alone)")
    add_clock_argument(parser, wall="wall time, device synchronised")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 8, one round: a smoke test")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    defaults = (
        ("tiny", 8, "fp32") if args.quick else ("vit_b16", 256, "bf16") if on_cuda else ("vit_s16", 4, "fp32")
    )
    for name, default in zip(("model", "batch_size", "dtype"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.quick:
        args.steps, args.rounds = 1, 1
    if args.warmup < 3 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup must be >= 3 (the towers compile during it), --steps and --rounds >= 1")
    if args.clock == "cpu" and on_cuda:
        parser.error("--clock cpu times CPU work only: use it with --device cpu")
    args.device = device
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print the report and append it to the output file (see `output_file`)."""

    def make_report(args: argparse.Namespace, command: str) -> str:
        quiet_lightning()
        settings = RunSettings(args.device, PRECISIONS[args.dtype], args.steps, args.warmup, args.clock)
        return report(args, command, [measure_method(method, args, settings) for method in args.methods])

    return run_benchmark("compile_cost", argv, parse_args, make_report)


if __name__ == "__main__":
    main()
