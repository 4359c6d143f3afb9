"""The `launcher` group: multiruns through hydra-submitit-launcher, SLURM requeue on SIGUSR1."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

import aclip  # noqa: F401  (the config resolvers, as train.py registers them)
from tests.helpers import CONF_DIR, TINY_SYNTHETIC_OVERRIDES, override_value, run_train_py

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_local_submitit_multirun_runs_two_jobs(tmp_path):
    """`python train.py -m launcher=local ...`: each job in its own process, each with its run directory."""
    run_train_py(
        "-m",
        "launcher=local",
        "model.optimizer.lr=1e-3,5e-4",
        "debug=fast_dev_run",
        "evaluation.at_end=false",
        *TINY_SYNTHETIC_OVERRIDES,
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    results = sorted(path.name for path in (sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2 and results[0] != results[1]  # two submitit jobs
    for job, lr in (("0", 1e-3), ("1", 5e-4)):
        assert json.loads((sweep / job / "timing.json").read_text())["optimizer_steps"] == 1
        assert math.isclose(float(override_value(sweep / job, "model.optimizer.lr")), lr)


def test_slurm_launcher_asks_for_the_devices_and_lightnings_requeue_signal(train_config, tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = train_config("launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = instantiate(cfg.hydra.launcher).params
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    sbatch = _make_sbatch_string(
        command="train",
        folder=tmp_path,
        nodes=launcher["nodes"],
        ntasks_per_node=launcher["tasks_per_node"],
        signal_delay_s=launcher["signal_delay_s"],
        additional_parameters=launcher["additional_parameters"],
    )
    assert f"#SBATCH --signal=USR1@{launcher['signal_delay_s']}" in sbatch.splitlines()
    assert "USR2" not in sbatch


def test_lightning_requeues_on_sigusr1_under_srun(monkeypatch):
    """What Lightning picks by itself in a task started by srun: auto-requeue on SIGUSR1."""
    slurm = {
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "7",
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert SLURMEnvironment.detect()
    environment = SLURMEnvironment()
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_sweep_dir_and_launcher_resolve_before_hydra_runtime_exists(launcher, tmp_path, monkeypatch):
    """What a multirun's sweeper does first, with no Hydra runtime config yet: resolve the sweep directory
    (under the launch directory's logs/) and the launcher's settings."""
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"launcher={launcher}",
                "hydra.launcher.partition=p",
                "trainer=ddp",
                "experiment=paper",
                "method=clip",
            ]
            if launcher == "slurm"
            else [f"launcher={launcher}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().cfg = None
    assert Path(cfg.hydra.sweep.dir).parent == tmp_path / "logs" / "train" / "multiruns"
    assert OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["nodes"] == 1
