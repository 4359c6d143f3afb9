"""What the benchmark scripts share on the command line and in their reports: arguments, the device and
code version they ran on, and where the report goes (BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
BENCHMARKS_FILE = REPOSITORY / "BENCHMARKS.md"


def run_benchmark(
    script: str,
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str]], argparse.Namespace],
    make_report: Callable[[argparse.Namespace, str], str],
) -> str:
    """A benchmark script's main: parse `argv` (default: the command line), make the report with the
    requested torch threads, print it and append it to the output file (see `output_file`)."""
    from benchmarks.timing import torch_threads

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "-m", f"benchmarks.{script}", *argv])
    with torch_threads(args.threads):
        text = make_report(args, command)
    publish(text, output_file(args))
    return text


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every benchmark script takes: `--device`, `--threads`, `--set` and the output's."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:i")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of torch (default: torch's); 1 is steadier on a busy machine"
    )
    add_override_argument(parser)
    add_output_arguments(parser)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): Hydra overrides of every variant's training config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of every variant's training config, e.g. model.compile=true (repeatable)",
    )


def check_compile_warmup(parser: argparse.ArgumentParser, overrides: Sequence[str], warmup: int) -> None:
    """Reject `model.compile=true` with fewer than 3 untimed steps: the towers compile during warm-up."""
    if any(o.replace(" ", "").lower() == "model.compile=true" for o in overrides) and warmup < 3:
        parser.error("model.compile=true compiles during the first steps: use --warmup 3 or more")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--output` and `--no-record`: where the report is appended."""
    parser.add_argument(
        "--output",
        type=Path,
        help="markdown file the report is appended to (default: BENCHMARKS.md; none with --quick)",
    )
    parser.add_argument("--no-record", action="store_true", help="print the report without appending it")


def output_file(args: argparse.Namespace) -> Path | None:
    """The file the report goes to: `--output`, else BENCHMARKS.md unless `--quick`; None: print only."""
    if args.no_record:
        return None
    if args.output is not None:
        return args.output
    return None if args.quick else BENCHMARKS_FILE


def publish(text: str, output: Path | None) -> None:
    """Print the report and append it to `output` (when given)."""
    print(text)
    if output is not None:
        with output.open("a") as file:
            file.write("\n" + text)


def code_version() -> str:
    """The checkout's commit, `-dirty` when the working tree has changes (`unknown` outside git)."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPOSITORY, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return described.stdout.strip() or "unknown"


def device_name(device: torch.device) -> str:
    """A short description of the device: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{_cpu_model()} ({os.cpu_count()} cores), torch using {threads} thread{'s' * (threads > 1)}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_head(script: str, command: str, device: str) -> list[str]:
    """A report's first lines: the script and today's date, the command, the code and torch versions,
    the device."""
    return [
        f"### {script}, {datetime.date.today().isoformat()}",
        "",
        f"- command: `{command}`",
        f"- code: `{code_version()}`; torch {torch.__version__}",
        f"- device: {device}",
    ]


def memory_text(peak_bytes: int | None, device: torch.device) -> str:
    """A peak device memory for a report: GiB on CUDA, `n/a on CPU` (nothing is measured there)."""
    return f"{(peak_bytes or 0) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a on CPU"


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda[:i]`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
