"""`logger=wandb`: offline without credentials, names from the Hydra choices, one run per job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from aclip import loggers
from aclip.summary.sweep import SweepSummary
from aclip.tasks import train

wandb = pytest.importorskip("wandb")

# Keys the dashboard needs, as they appear in the run's log (`run-<id>.wandb`, protobuf with plain keys).
LOGGED_KEYS = [
    "train/loss",
    "train/clip_loss",
    "train/logit_scale",
    "train/lr",
    "train/ema_momentum",
    "train/kept_tokens",
    "train/device/samples_per_sec",
    "train/device/flops_per_sec",
    "eval/zeroshot/synthetic/top1",
    "eval/retrieval/synthetic/i2t_R@1",
    "warmup_start_lr",  # the logged config
]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path: Path) -> None:
    """W&B sees no API key, netrc or settings file, and writes nothing outside `tmp_path`."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)  # also restores what WandbLogger sets
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))


def test_offline_exactly_without_credentials(no_credentials, monkeypatch):
    assert loggers.offline_by_default()
    monkeypatch.setattr("wandb.login", lambda **kwargs: True)
    assert not loggers.offline_by_default()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert loggers.offline_by_default()


def test_run_names_from_experiment_and_masking(train_config):
    train_config("experiment=tiny", "masking=random")
    assert loggers._run_names() == ("tiny-random", "tiny")
    sweep = "logs/train/multiruns/2026-01-02_03-04-05"
    train_config(
        "experiment=tiny",
        "masking=random",
        "hydra.mode=MULTIRUN",
        "hydra.job.num=3",
        f"hydra.sweep.dir={sweep}",
    )
    assert loggers._run_names() == ("tiny-random-3", "tiny-2026-01-02_03-04-05")
    train_config("masking=none")  # the default experiment, tiny
    assert loggers._run_names() == ("tiny-none", "tiny")
    train_config("experiment=paper", "method=aclip")  # a method at a scale
    assert loggers._run_names() == ("paper-aclip-attentive_low", "paper")
    train_config("method=aclip")  # a method at the default scale
    assert loggers._run_names() == ("tiny-aclip-attentive_low", "tiny")


def test_offline_run_holds_metrics_config_and_mask_pictures(
    no_credentials, monkeypatch, train_config, tmp_path
):
    """Two jobs in one process (as a multirun's basic launcher runs them): two runs, each complete."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, whatever the detection says
    steps = [
        "logger=wandb",
        "trainer.log_every_n_steps=1",
        "callbacks.mask_pictures.every_n_steps=1",
        "callbacks.throughput.window_size=2",
        "trainer.limit_train_batches=2",
    ]
    train(train_config(*steps))
    train(train_config(*steps, "evaluation.at_end=false", output_dir=tmp_path / "second"))

    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (second,) = (tmp_path / "second" / "wandb").glob("offline-run-*")
    assert run.name.split("-")[-1] != second.name.split("-")[-1]  # distinct run ids
    log = b"".join(path.read_bytes() for path in run.glob("run-*.wandb"))
    missing = [key for key in LOGGED_KEYS if key.encode() not in log]
    assert not missing, f"not in the offline run's log: {missing}"
    assert b"tiny-none" in log  # the run name
    pictures = list((run / "files" / "media" / "images").rglob("*.png"))
    assert pictures, "no mask picture in the offline run"


def test_resumed_run_continues_the_same_wandb_run(no_credentials, monkeypatch, train_config, tmp_path):
    """A run resumed from its checkpoint, in a new run directory, logs to the W&B run it started."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = tmp_path / "first"
    train(
        train_config(
            "logger=wandb", "trainer.limit_train_batches=2", "evaluation.at_end=false", output_dir=first
        )
    )
    resumed = tmp_path / "resumed"
    train(
        train_config(
            "logger=wandb",
            "trainer.limit_train_batches=2",
            "trainer.max_epochs=2",
            "evaluation.at_end=false",
            f"ckpt_path={first}",
            output_dir=resumed,
        )
    )
    (run,) = (first / "wandb").glob("offline-run-*")
    (continued,) = (resumed / "wandb").glob("offline-run-*")
    run_id = (first / loggers.RUN_ID_FILE).read_text().strip()
    assert run.name.endswith(f"-{run_id}") and continued.name.endswith(f"-{run_id}")
    assert (resumed / loggers.RUN_ID_FILE).read_text().strip() == run_id  # for the next resume
    # A fresh run gets an id of its own.
    train(train_config("logger=wandb", "trainer.limit_train_batches=1", "evaluation.at_end=false"))
    assert (tmp_path / "run" / loggers.RUN_ID_FILE).read_text().strip() != run_id


def test_failed_run_is_closed_as_failed(no_credentials, monkeypatch, train_config):
    monkeypatch.setenv("WANDB_MODE", "offline")
    finished = []
    monkeypatch.setattr(
        "wandb.sdk.wandb_run.Run.finish", lambda self, exit_code=None, **kwargs: finished.append(exit_code)
    )
    cfg = train_config(
        "logger=wandb",
        "trainer.limit_train_batches=2",
        "model.optimizer.lr=1e12",  # with the warm-up's second step, the weights overflow
        "model.scheduler.warmup_epochs=0.1",
        "evaluation.at_end=false",
    )
    with pytest.raises(FloatingPointError):
        train(cfg)
    assert finished == [1]
    monkeypatch.undo()
    wandb.finish()  # the run that the stand-in left open, so that the next test's runs are its own


def write_job(sweep: Path, number: int, choices: dict[str, str], top1: float) -> None:
    """A finished multirun job's folder: what the summary reads, and the choices Hydra records."""
    hydra = sweep / str(number) / ".hydra"
    hydra.mkdir(parents=True)
    overrides = [f"{key}={value}" for key, value in choices.items()]
    OmegaConf.save(OmegaConf.create(overrides), hydra / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), hydra / "hydra.yaml")
    metrics = {"ema": {"zeroshot/synthetic/top1": top1}}
    (sweep / str(number) / "metrics.json").write_text(json.dumps(metrics))


def test_sweep_summary_is_logged_as_a_run_in_the_jobs_group(
    no_credentials, monkeypatch, train_config, tmp_path
):
    """At the end of a multirun Hydra passes the sweep's config, which has no job number."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "multiruns" / "2026-01-02_03-04-05"
    cfg = train_config("logger=wandb", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}")
    assert OmegaConf.is_missing(cfg.hydra.job, "num")
    for number, masking in enumerate(("random", "grid")):
        write_job(sweep, number, {"experiment": "tiny", "masking": masking}, 10.0 + number)
    SweepSummary().on_multirun_end(config=cfg)

    (run,) = (sweep / "wandb").glob("offline-run-*")
    wandb.teardown()  # the W&B service writes the run's log on its own: wait until it has
    log = b"".join(path.read_bytes() for path in run.glob("run-*.wandb"))
    assert b"sweep-summary" in log and b"tiny-2026-01-02_03-04-05-summary" in log
    assert b"sweep/summary" in log
