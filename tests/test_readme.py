"""The documentation's commands, run as a user types them: every shell command of README.md and docs/*.md.

Each command runs in a fresh copy of the repository (its tracked and untracked-but-not-ignored files),
with that copy as the working directory, through the same `.venv` (the copy's `.venv` links to the
interpreter running the tests). The only changes made to a command: tiny-size overrides appended to
`train.py` and `evaluate.py` commands (a tiny model, a few samples and steps; one seed of a many-seed
sweep), the benchmarks' own `--quick` (the tiny model, a step or a few samples) to `-m benchmarks.*`
commands, and the docs' `<...>` placeholders filled with real paths of the copy (a run directory, a
checkpoint, a sweep). Never a `paths.*` or `hydra.*` override, nor an environment variable. A command
that needs what this machine lacks (a GPU, a cluster, a dataset) is listed in SKIPPED with the reason.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from aclip.checkpointing import read_checkpoint
from aclip.cli import compose
from tests.helpers import TINY_SYNTHETIC_OVERRIDES, fresh_copy

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_NEEDS_GPU = "needs CUDA GPUs, which the test machine lacks"
_NEEDS_SLURM = "needs a SLURM cluster"
_NEEDS_PAPER_DATA = "trains the paper preset: YFCC-15M on 8 GPUs x 8 nodes"
_NEEDS_EVAL_DATA = "needs the downstream evaluation sets on disk (ImageNet, Flickr30K, COCO, ...)"
_NEEDS_LAION = "trains CLIPA's preset: LAION-400M on 8 GPUs"
_NOT_A_DEPENDENCY = "needs clip_benchmark, which is not a dependency (README: measured by hand)"
_INSTALLS = (
    "tests/test_install.py runs it: the wheel in a fresh virtual environment, the scripts from a "
    "directory outside the repository"
)
SKIPPED: dict[str, str] = {
    "make train": "the default training itself runs below as `.venv/bin/python train.py` (make adds only "
    "the .venv set-up, which this suite already ran in)",
    "make test": "this suite itself",
    ".venv/bin/python -m pytest -m slow": "the long tests, deselected from the default suite on purpose",
    ".venv/bin/python train.py model=vit_b16 trainer=gpu data.batch_size=256 trainer.max_epochs=10": (
        _NEEDS_GPU
    ),
    ".venv/bin/python train.py experiment=paper method=aclip": _NEEDS_PAPER_DATA,
    ".venv/bin/python train.py experiment=paper method=aclip_eff": _NEEDS_PAPER_DATA,
    ".venv/bin/python train.py experiment=paper method=attentive_high": _NEEDS_PAPER_DATA,
    ".venv/bin/python train.py experiment=paper method=aclip trainer=ddp trainer.devices=8": _NEEDS_GPU,
    "srun .venv/bin/python train.py experiment=paper method=aclip trainer.num_nodes=2 trainer.devices=8 "
    "hydra.run.dir=logs/train/slurm/${SLURM_JOB_ID}": _NEEDS_SLURM,
    ".venv/bin/python train.py -m launcher=slurm hydra.launcher.partition=<p> trainer=ddp "
    "experiment=paper method=clip,aclip": _NEEDS_SLURM + " (tests/test_launcher.py composes and resolves it)",
    ".venv/bin/python evaluate.py ckpt_path=<ckpt> eval=[imagenet,flickr30k,coco]": _NEEDS_EVAL_DATA,
    ".venv/bin/python evaluate.py ckpt_path=<ckpt> eval=[slip26]": _NEEDS_EVAL_DATA,
    ".venv/bin/python train.py eval=[synthetic,imagenet]": _NEEDS_EVAL_DATA,
    ".venv/bin/python evaluate.py ckpt_path=path/to/last.ckpt eval=[imagenet,flickr30k,coco]": (
        _NEEDS_EVAL_DATA
    ),
    ".venv/bin/python evaluate.py ckpt_path=path/to/last.ckpt eval=[slip26]": _NEEDS_EVAL_DATA,
    ".venv/bin/python train.py eval=[synthetic,cifar10]": _NEEDS_EVAL_DATA,
    'RESUME=$([ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && echo ckpt_path=last)': _NEEDS_SLURM,
    "srun .venv/bin/python train.py ... hydra.run.dir=logs/train/slurm/${SLURM_JOB_ID} ${RESUME}": (
        _NEEDS_SLURM
    ),
    ".venv/bin/torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
    "--rdzv-endpoint=<first node>:29500 --rdzv-id=aclip-1 train.py experiment=paper method=aclip "
    "trainer.num_nodes=2 trainer.devices=8 hydra.run.dir=logs/train/torchrun/aclip-1": (
        _NEEDS_GPU + " on two nodes"
    ),
    '.venv/bin/pip install -e ".[slurm]"': "installs an extra that the dev extra of this .venv holds",
    '.venv/bin/pip install -e ".[wandb]"': "installs an extra that the dev extra of this .venv holds",
    ".venv/bin/python train.py -m launcher=slurm hydra.launcher.partition=<partition> "
    "hydra.launcher.timeout_min=2880 experiment=paper trainer.num_nodes=4 "
    "method=attentive_2x50,random_2x50": _NEEDS_SLURM,
    "bash benchmarks/gpu.sh": _NEEDS_GPU + " (tests/test_benchmarks.py checks every option it passes)",
    ".venv/bin/python train.py experiment=clipa_b16_i50_t16 "
    "\"data.train.urls='/data/laion400m/{00000..41407}.tar'\" data.train.num_samples=400000000": _NEEDS_LAION,
    ".venv/bin/python train.py experiment=clipa_b16_i50_t16_finetune "
    "\"data.train.urls='/data/laion400m/{00000..41407}.tar'\" model.init_from=logs/train/runs/<timestamp>": (
        _NEEDS_LAION
    ),
    "pip install clip_benchmark": _NOT_A_DEPENDENCY,
    "clip_benchmark eval --model local-dir:exported --pretrained none --dataset cifar10 --dataset_root <dir> "
    "--output cifar10.json": _NOT_A_DEPENDENCY + " and CIFAR-10",
    ".venv/bin/python -m analysis.clip_benchmark_check logs/train/runs/<timestamp>": _NOT_A_DEPENDENCY,
    ".venv/bin/python train.py -m hparams_search=laboratory": "48 jobs whose budget buys 91 to 305 "
    "steps each at the tiny scale (thousands at the tests'); tests/test_compute.py runs the sweep at the "
    "tests' scale (test_the_laboratory_sweep_runs_from_a_fresh_clone_at_equal_flops)",
    '.venv/bin/python train.py -m hparams_search=laboratory data=segments "eval=[segments]"': "the same "
    "48 jobs on the segments variant; tests/test_recipe.py trains that variant, tests/test_compute.py "
    "the sweep",
    "pip install .": _INSTALLS,
    "aclip-train debug=fast_dev_run": _INSTALLS,
    "aclip-eval ckpt_path=logs/train/runs/<timestamp>": _INSTALLS,
}

# A tiny model on a few samples of the built-in data: every training job takes a few steps.
TRAIN_OVERRIDES = [o for o in TINY_SYNTHETIC_OVERRIDES if not o.startswith("trainer.enable_")]
TRAIN_OVERRIDES = [o.replace("data.train.size=32", "data.train.size=16") for o in TRAIN_OVERRIDES]
# A documented sweep over many seeds runs one seed here (a command-line value replaces the preset's sweep).
ONE_SEED = {"hparams_search=table2": "seed=0"}
EVAL_OVERRIDES = [
    "evaluation.sets.synthetic.dataset.size=48",
    "evaluation.sets.synthetic_retrieval.dataset.size=12",
    "evaluation.loader.batch_size=32",
    "evaluation.loader.num_workers=0",
]


def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` after white space, outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def shell_commands(path: Path) -> list[str]:
    """The commands of the ```bash / ```sh blocks of a Markdown file, continuation lines joined."""
    commands, block, pending = [], None, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block not in ("bash", "sh", "shell"):
            continue
        text = _strip_comment(line) if not line.lstrip().startswith("#") else ""
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        command = re.sub(r"\s+", " ", (pending + text).strip())
        pending = ""
        if command:
            commands.append(command)
    return commands


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every command, in document order, each command once."""
    seen, found = set(), []
    for document in DOCUMENTS:
        for command in shell_commands(document):
            if command not in seen:
                seen.add(command)
                found.append((document.name, command))
    return found


COMMANDS = documented_commands()


def test_skips_name_documented_commands():
    """Every skip entry is a command the docs still show (no stale entries)."""
    documented = {command for _, command in COMMANDS}
    assert set(SKIPPED) <= documented, sorted(set(SKIPPED) - documented)


def test_gpu_example_trains_past_its_warmup():
    """The README's ViT-B/16 example (skipped here: it needs a GPU) is not all learning-rate warm-up:
    `model=vit_b16` warms up for one epoch, and the default run is one epoch long."""
    (command,) = [c for _, c in documented_commands() if "train.py model=vit_b16 trainer=gpu" in c]
    cfg = compose("train", command.split()[2:])
    assert cfg.model.scheduler.warmup_steps is None
    assert cfg.model.scheduler.warmup_epochs < cfg.trainer.max_epochs


def _newest(pattern: str, folder: Path) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def _run(command: str, copy: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, shell=True, cwd=copy, capture_output=True, text=True, timeout=900, env=dict(os.environ)
    )


def with_overrides(command: str, copy: Path) -> str:
    """`command` with the tiny overrides appended (to `train.py` and `evaluate.py` commands)."""
    if re.search(r"\btrain\.py\b", command) and "--help" not in command:
        extra = []
        if "ckpt_path=" in command:  # a resumed run trains one epoch more than the run it resumes
            last = _newest("logs/train/runs/*/checkpoints/last.ckpt", copy)
            extra = [f"trainer.max_epochs={read_checkpoint(last)['epoch'] + 2}"]
        extra += [seed for preset, seed in ONE_SEED.items() if preset in command.split()]
        return " ".join([command, *TRAIN_OVERRIDES, *EVAL_OVERRIDES[:2], *extra])
    if re.search(r"\bevaluate\.py\b", command):
        return " ".join([command, *EVAL_OVERRIDES])
    if re.search(r"-m benchmarks\.\w+", command):
        return f"{command} --quick"
    return command


def with_placeholders_filled(command: str, copy: Path) -> str:
    """`command` with the docs' `<...>` placeholders replaced by the newest run, checkpoint and sweep."""
    run = _newest("logs/train/runs/*/checkpoints/last.ckpt", copy).parents[1]
    sweep = _newest("logs/train/multiruns/*", copy)
    fills = {
        "logs/train/runs/<timestamp>/checkpoints/step0003662.ckpt": _newest("checkpoints/step*.ckpt", run),
        "logs/train/runs/<timestamp>/checkpoints/last.ckpt": run / "checkpoints" / "last.ckpt",
        "logs/train/runs/<timestamp>": run.relative_to(copy),
        "logs/train/multiruns/<timestamp>": sweep.relative_to(copy) if sweep else None,
        "<ckpt>": run / "checkpoints" / "last.ckpt",
        "<the run's overrides> ": "",
    }
    for placeholder, value in fills.items():
        if placeholder in command:
            assert value is not None, f"nothing in the copy for {placeholder} of {command!r}"
            command = command.replace(placeholder, str(value))
    assert "<" not in command, f"unknown placeholder in {command!r}"
    return command


def _swept_values(command: str) -> dict[str, set[str]]:
    """The values of each comma-separated (swept) override of a multirun command."""
    return {
        key: set(values.split(","))
        for key, values in re.findall(r"(?<=\s)([\w.]+)=([^\s\[\]]+,[^\s\[\]]+)", command)
    }


def _number_or_text(value: str) -> float | str:
    """Hydra writes a swept `1e-3` as `0.001`: numbers compare as numbers."""
    try:
        return float(value)
    except ValueError:
        return value


def check_sweep(command: str, copy: Path) -> None:
    """The command's sweep wrote its summary: one row per job folder, each with metrics and its values."""
    sweep = _newest("logs/train/multiruns/*", copy)
    jobs = [path for path in sweep.iterdir() if path.is_dir() and path.name.isdigit()]
    with (sweep / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(jobs) > 0
    assert all(row["status"] == "ok" for row in rows), rows
    assert all(any(key.endswith("/top1") and row[key] for key in row) for row in rows)
    for key, values in _swept_values(command).items():
        assert {_number_or_text(row[key]) for row in rows} == set(map(_number_or_text, values)), (key, rows)
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()


@dataclass
class Outcome:
    command: str  # as run: placeholders filled, overrides appended
    result: subprocess.CompletedProcess
    copy: Path


def _run_in(copy: Path, commands: list[str]) -> dict[str, Outcome]:
    outcomes = {}
    for command in commands:
        run = with_overrides(with_placeholders_filled(command, copy) if "<" in command else command, copy)
        outcomes[command] = Outcome(run, _run(run, copy), copy)
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> Iterator[dict[str, Outcome]]:
    """Every documented command that is not skipped, run two at a time (each run mostly imports).

    Each command without a placeholder runs in a fresh copy of its own; the commands with placeholders
    run one after another in one copy, after the README's plain `train.py` (and the sweep a placeholder
    for a sweep directory follows in the docs), whose run (or sweep) they then name; a second training
    stage (`model.init_from=<run>` right after a `train.py` command), and a command naming a run right
    after a `train.py` command of another model (`model.*`), runs after that command, the pairs in a copy
    of their own.
    """
    runnable = [command for _, command in COMMANDS if command not in SKIPPED]
    chain, stages = [".venv/bin/python train.py"], []
    for index, command in enumerate(runnable):
        if "<" not in command:
            continue
        before = runnable[index - 1]
        if (
            (
                "init_from=logs/train/runs/<" in command
                or ("logs/train/runs/<" in command and " model." in before)
            )
            and re.search(r"\btrain\.py\b", before)
            and "<" not in before
        ):
            # A second stage starts from the run the docs train just before it, and a command names the run
            # of another model the docs train just before it: the pairs run in a copy of their own, so that
            # no other command names their runs.
            stages += [before, command]
            continue
        if "logs/train/multiruns/<" in command:  # names the sweep the docs ran just before it
            sweep = next(c for c in reversed(runnable[:index]) if re.search(r"\btrain\.py -m\b", c))
            chain += [sweep] if sweep not in chain else []
        chain.append(command)
    alone = [command for command in runnable if command not in chain + stages]
    jobs = [chain, *([stages] if stages else []), *([command] for command in alone)]
    copies = [fresh_copy(tmp_path_factory.mktemp("fresh")) for _ in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_run_in, copy, commands) for copy, commands in zip(copies, jobs, strict=True)]
    yield {command: outcome for future in futures for command, outcome in future.result().items()}
    # The runs' checkpoints, 2.4 GB in all, would otherwise stay on disk until the whole suite ends; their
    # logs stay for a failure to be read.
    for checkpoint in (path for copy in copies for path in copy.rglob("*.ckpt")):
        checkpoint.unlink()


@pytest.mark.parametrize(("document", "command"), COMMANDS, ids=[command for _, command in COMMANDS])
def test_documented_command_runs_as_written(document, command, outcomes):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    outcome = outcomes[command]
    result = outcome.result
    assert result.returncode == 0, (
        f"{document}: {outcome.command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    if re.search(r"\btrain\.py -m\b", command):
        check_sweep(command, outcome.copy)
