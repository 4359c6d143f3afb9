"""The installable package: a plain (non-editable) install ships the configs, and its console scripts
train and evaluate from a directory outside the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from aclip.tasks import train as train_in_process
from tests.helpers import SYNTHETIC_EVAL_OVERRIDES, TINY_SYNTHETIC_OVERRIDES, compose_config, fresh_copy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built as a wheel, as `pip install .` builds it."""
    directory = tmp_path_factory.mktemp("wheel")
    clone = fresh_copy(tmp_path_factory.mktemp("clone"), venv=False)  # setuptools builds in the tree
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", directory]
    subprocess.run([*build, clone], check=True, capture_output=True)
    return next(directory.glob("aclip-*.whl"))


def test_the_wheel_holds_every_config_and_every_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    configs = {f"aclip/conf/{path.relative_to(REPO / 'conf')}" for path in (REPO / "conf").rglob("*.yaml")}
    modules = {str(path.relative_to(REPO)) for path in (REPO / "aclip").rglob("*.py")}
    assert configs - names == set() and modules - names == set()
    assert "aclip/conf/train.yaml" in names and not any(name.startswith("tests/") for name in names)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel) -> Path:
    """A fresh virtual environment holding aclip installed from its wheel (not editable); the
    dependencies come from the environment running the tests, through a path file."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # A plain path entry: the test environment's packages, not its .pth files (its editable aclip).
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "-q"]
    subprocess.run([*install, wheel], check=True, capture_output=True)
    return venv


def test_console_scripts_train_and_evaluate_outside_the_repository(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    train = subprocess.run(
        [installed / "bin" / "aclip-train", "debug=fast_dev_run"], cwd=work, capture_output=True, text=True
    )
    assert train.returncode == 0, train.stderr[-4000:]
    (run,) = (work / "logs" / "train" / "runs").iterdir()
    assert (run / "metrics.json").is_file()
    # The run composed the installed package's configs and ran its code, not the repository's.
    hydra = (run / ".hydra" / "hydra.yaml").read_text()
    assert f"{installed}/lib" in hydra and str(REPO / "conf") not in hydra
    where = subprocess.run(
        [installed / "bin" / "python", "-c", "import aclip; print(aclip.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(installed))

    # A checkpoint of the repository's code, evaluated by the installed package.
    trained = compose_config(
        "train",
        [*TINY_SYNTHETIC_OVERRIDES, "trainer.max_steps=1", "evaluation.at_end=false"],
        tmp_path / "trained",
    )
    train_in_process(trained)
    evaluate = subprocess.run(
        [installed / "bin" / "aclip-eval", f"ckpt_path={tmp_path / 'trained'}", *SYNTHETIC_EVAL_OVERRIDES],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    (evaluation,) = (work / "logs" / "eval" / "runs").iterdir()
    assert "zeroshot/synthetic/top1" in json.loads((evaluation / "metrics.json").read_text())["ema"]
