"""The installable package: a plain (non-editable) install ships the configs, and its console scripts
train and evaluate from a directory outside the repository."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built as a wheel, as `pip install .` builds it."""
    directory = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", directory]
    subprocess.run([*build, REPO], check=True, capture_output=True)
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

    evaluate = subprocess.run(
        [installed / "bin" / "aclip-eval", "--help"], cwd=work, capture_output=True, text=True
    )
    assert evaluate.returncode == 0 and "ckpt_path" in evaluate.stdout, evaluate.stderr[-2000:]
